/* tcpmesh kernel-header stub: intentionally empty (bcc includes <asm/page.h>, nothing in it is used). */
