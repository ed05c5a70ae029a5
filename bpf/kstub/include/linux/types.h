/* tcpmesh kernel-header stub: the kernel-internal short type names bcc's helpers.h uses. */
#ifndef _BCC_STUB_LINUX_TYPES_H
#define _BCC_STUB_LINUX_TYPES_H
#include <uapi/linux/types.h>
typedef __u8 u8; typedef __s8 s8; typedef __u16 u16; typedef __s16 s16;
typedef __u32 u32; typedef __s32 s32; typedef __u64 u64; typedef __s64 s64;
typedef _Bool bool; enum { false = 0, true = 1 };
typedef unsigned long size_t; typedef long ssize_t; typedef unsigned long uintptr_t;
#endif
