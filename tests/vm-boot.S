/* The boot sector of test-vm-boot.sh (GNU as, 16-bit real mode).
 *
 * A virtual machine's BIOS loads it from sector 0 of the exported
 * file and runs it.  Through the BIOS disk services (int 13h, the
 * extended read and write of AH=42h and AH=43h) it:
 *  1. reads sectors 1..32 and prints their sum (32-bit words, mod 2^32);
 *  2. reads sector 2048 and prints how many of its bytes are 'V';
 *  3. fills sector 2048 with 'V' (AH=43h), reads it back and prints
 *     the count again;
 * each on the first serial port, then halts.  A disk error prints
 * "disk error" (a refused write: "write failed") and halts.
 */
        .code16
        .text
        .globl _start
_start:
        cli
        xorw    %ax, %ax
        movw    %ax, %ds
        movw    %ax, %es
        movw    %ax, %ss
        movw    $0x7c00, %sp
        sti
        cld
        movb    %dl, drive              /* the BIOS's boot drive */
        movw    $m_boot, %si
        call    puts

        movw    $dap_sum, %si
        call    read
        xorl    %eax, %eax
        movw    $0x8000, %si
        movw    $4096, %cx              /* 32 sectors of 128 words */
1:      addl    (%si), %eax
        addw    $4, %si
        loop    1b
        movw    $m_sum, %si
        call    putnum

        movw    $dap_before, %si
        call    read
        movw    $0xe000, %si
        call    count_v
        movw    $m_before, %si
        call    putnum

        movw    $0xc000, %di
        movb    $'V', %al
        movw    $512, %cx
        rep stosb
        movw    $0x4300, %ax
        movb    drive, %dl
        movw    $dap_write, %si
        int     $0x13
        jnc     2f
        movw    $m_wfail, %si
        jmp     halt
2:      movw    $dap_after, %si
        call    read
        movw    $0xd000, %si
        call    count_v
        movw    $m_after, %si
        call    putnum
        movw    $m_done, %si
halt:   call    puts
3:      cli
        hlt
        jmp     3b

/* read: the extended read of the packet at %si (halts on an error). */
read:   movb    $0x42, %ah
        movb    drive, %dl
        int     $0x13
        jc      4f
        ret
4:      movw    $m_fail, %si
        jmp     halt

/* count_v: %eax = the number of 'V' bytes in the 512 at %si. */
count_v:
        xorl    %eax, %eax
        movw    $512, %cx
5:      cmpb    $'V', (%si)
        jne     6f
        incl    %eax
6:      incw    %si
        loop    5b
        ret

/* putnum: the string at %si, %eax in 8 hex digits, a newline. */
putnum: pushl   %eax
        call    puts
        popl    %eax
        movw    $8, %cx
7:      roll    $4, %eax
        movb    %al, %bl
        andb    $0xf, %bl
        addb    $'0', %bl
        cmpb    $'9', %bl
        jbe     8f
        addb    $('a' - '9' - 1), %bl
8:      pushl   %eax
        movb    %bl, %al
        call    putc
        popl    %eax
        loop    7b
        movb    $'\n', %al
        jmp     putc

/* puts: the NUL-terminated string at %si. */
puts:   lodsb
        testb   %al, %al
        jz      9f
        call    putc
        jmp     puts
9:      ret

putc:   movw    $0x3f8, %dx
        outb    %al, %dx
        ret

drive:  .byte   0
        .balign 4
/* Disk address packets: size, 0, sectors, offset, segment, LBA (64). */
dap_sum:    .byte 16, 0
            .word 32, 0x8000, 0
            .long 1, 0
dap_before: .byte 16, 0
            .word 1, 0xe000, 0
            .long 2048, 0
dap_write:  .byte 16, 0
            .word 1, 0xc000, 0
            .long 2048, 0
dap_after:  .byte 16, 0
            .word 1, 0xd000, 0
            .long 2048, 0
m_boot:     .asciz "ext4fs-vm: booted\n"
m_sum:      .asciz "ext4fs-vm: sum "
m_before:   .asciz "ext4fs-vm: before "
m_after:    .asciz "ext4fs-vm: after "
m_done:     .asciz "ext4fs-vm: done\n"
m_wfail:    .asciz "ext4fs-vm: write failed\n"
m_fail:     .asciz "ext4fs-vm: disk error\n"
        .org    510
        .word   0xaa55
