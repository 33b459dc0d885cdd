/* Entry point (ABI.md): 64-bit long mode, CPL3, IOPL=3, IF=0,
 * RSP = top of the stack area (set by the VMM), RDI = boot info GPA.
 * Clears .bss (the VMM zero-fills it too; this costs nothing and does not
 * depend on it), then rt_init(bi), status = main(bi), exit(status). */
    .section .text.start, "ax"
    .globl _start
    .type _start, @function
_start:
    mov     %rdi, %rbx              /* boot info, callee-saved */
    and     $-16, %rsp              /* SysV: 16-byte aligned before a call */
    xor     %ebp, %ebp
    cld
    lea     __bss_start(%rip), %rdi
    lea     __bss_end(%rip), %rcx
    sub     %rdi, %rcx
    xor     %eax, %eax
    rep stosb
    mov     %rbx, %rdi
    call    rt_init
    mov     %rbx, %rdi
    call    main
    mov     %eax, %edi
    call    exit
1:  mov     $0x501, %dx             /* not reached: exit() does not return */
    outl    %eax, %dx
    jmp     1b
    .size _start, . - _start

    .section .note.GNU-stack, "", @progbits
