/* tcpmesh kernel-header stub: intentionally empty (bcc includes it, nothing in it is used). */
