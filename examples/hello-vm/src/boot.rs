//! From the PVH entry to Rust.
//!
//! 1. qemu's loader finds the `XEN_ELFNOTE_PHYS32_ENTRY` note (type 18) and enters
//!    `pvh_start32` in 32-bit protected mode, paging off, `ebx` = physical address of the
//!    `hvm_start_info` block.
//! 2. We identity-map the first 4 GiB with 2 MiB pages (RAM low, virtio-mmio at 0xfeb00000;
//!    the top GiB is mapped uncached), enable PAE, set EFER.LME, enable paging: long mode.
//! 3. A far jump through our own GDT lands in 64-bit code, which loads data segments, sets
//!    the stack, enables SSE (the precompiled `core` uses SSE2) and calls
//!    [`kernel_main`](crate::kernel_main) with the start-info address.
//!
//! Interrupts stay disabled for the life of the kernel: everything is polled.

use core::arch::global_asm;

/// Size of the boot stack.
pub const STACK_SIZE: usize = 256 * 1024;

global_asm!(
    r#"
    .section .note.Xen, "a", @note
    .balign 4
    .long 4                 /* name size: "Xen\0" */
    .long 8                 /* descriptor size */
    .long 18                /* XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .balign 4
    .quad pvh_start32       /* qemu reads a 64-bit entry from an ELF64 note */
    .balign 4

    .section .text.boot, "ax", @progbits
    .code32
    .global pvh_start32
pvh_start32:
    cli
    cld
    movl %ebx, %esi                     /* keep the start-info pointer for kernel_main */

    /* 2048 page-directory entries: 4 GiB in 2 MiB pages (present, writable, large). */
    movl $boot_pd, %edi
    xorl %ecx, %ecx
1:
    movl %ecx, %eax
    shll $21, %eax
    orl $0x83, %eax
    cmpl $1536, %ecx
    jb 2f
    orl $0x18, %eax                     /* 3..4 GiB is device memory: PCD | PWT */
2:
    movl %eax, (%edi,%ecx,8)
    incl %ecx
    cmpl $2048, %ecx
    jb 1b

    /* Four page-directory-pointer entries, one page-map level-4 entry. */
    movl $boot_pdpt, %edi
    movl $boot_pd + 3, %eax
    movl %eax, 0(%edi)
    addl $4096, %eax
    movl %eax, 8(%edi)
    addl $4096, %eax
    movl %eax, 16(%edi)
    addl $4096, %eax
    movl %eax, 24(%edi)
    movl $boot_pdpt + 3, %eax
    movl %eax, boot_pml4

    movl %cr4, %eax
    orl $(1 << 5), %eax                 /* PAE */
    movl %eax, %cr4
    movl $boot_pml4, %eax
    movl %eax, %cr3
    movl $0xC0000080, %ecx              /* EFER */
    rdmsr
    orl $(1 << 8), %eax                 /* LME */
    wrmsr
    movl %cr0, %eax
    orl $0x80000001, %eax               /* PG | PE */
    movl %eax, %cr0

    lgdt boot_gdt_ptr
    ljmp $0x08, $pvh_start64

    .code64
pvh_start64:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movw %ax, %fs
    movw %ax, %gs
    leaq boot_stack_top(%rip), %rsp

    /* SSE: clear CR0.EM, set CR0.MP; set CR4.OSFXSR and CR4.OSXMMEXCPT. */
    movq %cr0, %rax
    andq $~(1 << 2), %rax
    orq $(1 << 1), %rax
    movq %rax, %cr0
    movq %cr4, %rax
    orq $(3 << 9), %rax
    movq %rax, %cr4

    movl %esi, %edi
    xorl %ebp, %ebp
    call kernel_main
3:
    cli
    hlt
    jmp 3b

    .section .rodata.boot, "a", @progbits
    .balign 8
boot_gdt:
    .quad 0
    .quad 0x00af9a000000ffff            /* 0x08: 64-bit code */
    .quad 0x00cf92000000ffff            /* 0x10: data */
boot_gdt_end:
boot_gdt_ptr:
    .word boot_gdt_end - boot_gdt - 1
    .quad boot_gdt

    .section .bss.boot, "aw", @nobits
    .balign 4096
boot_pml4:
    .skip 4096
boot_pdpt:
    .skip 4096
boot_pd:
    .skip 4 * 4096
    .balign 16
boot_stack:
    .skip {stack_size}
boot_stack_top:
    "#,
    stack_size = const STACK_SIZE,
    options(att_syntax)
);

/// `hvm_start_info.magic`.
const START_INFO_MAGIC: u32 = 0x336e_c578;

/// The kernel command line from the PVH start info, if there is one.
///
/// # Safety
/// `start_info` must be the address the PVH loader passed in `ebx` (or 0), with all low
/// memory identity mapped, and nothing may ever write the command line.
pub unsafe fn cmdline(start_info: u32) -> &'static str {
    if start_info == 0 {
        return "";
    }
    let info = start_info as usize as *const u32;
    // SAFETY: the loader's start-info block is at least 32 bytes: magic at 0,
    // cmdline_paddr (u64) at 24; both are read without assuming alignment.
    let (magic, cmdline) = unsafe {
        (
            info.read_unaligned(),
            (info as *const u8).add(24).cast::<u64>().read_unaligned(),
        )
    };
    if magic != START_INFO_MAGIC || cmdline == 0 {
        return "";
    }
    let start = cmdline as usize as *const u8;
    let mut len = 0;
    // SAFETY: the command line is a NUL-terminated string in guest RAM; we stop at the NUL
    // or at 4 KiB, whichever comes first.
    while len < 4096 && unsafe { start.add(len).read() } != 0 {
        len += 1;
    }
    // SAFETY: `len` bytes from `start` were just read and are never written again.
    let bytes = unsafe { core::slice::from_raw_parts(start, len) };
    core::str::from_utf8(bytes).unwrap_or("")
}
