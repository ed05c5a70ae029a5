/* tcpmesh kernel-header stub: bcc requires <kpath>/include/linux/kconfig.h to exist.
 * Only what bcc's own helpers.h checks is defined; everything else comes from UAPI headers
 * (linux-libc-dev) reached through the include/uapi symlinks that agent/bpf/kstub.py creates. */
#define CONFIG_BPF 1
#define CONFIG_BPF_SYSCALL 1
#define CONFIG_64BIT 1
/* bcc passes -D__TARGET_ARCH_<arch> for the host architecture. */
#if defined(__TARGET_ARCH_x86)
#define CONFIG_X86_64 1
#elif defined(__TARGET_ARCH_arm64)
#define CONFIG_ARM64 1
#endif
/* bcc brings its own BPF UAPI (guard _UAPI__LINUX_BPF_H__); suppress libc-dev's copy (guard __LINUX_BPF_H__). */
#define __LINUX_BPF_H__ 1
