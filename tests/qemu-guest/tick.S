/*
 * A boot-sector guest for the fdbox-qemu tests: proves that a guest's RAM and CPU
 * state survived a QEMU restart (and a host kexec) through fdbox.
 *
 * At boot it draws a token from rdtsc, fills REGION (0x10000..0x8ffff, 512 KiB) with an
 * LCG stream seeded by the token, and stores the token, the region's checksum and a
 * counter in low RAM (0x500..). Then, forever, once per BIOS timer tick (~55 ms): it
 * re-sums the region and prints
 *
 *     tick N token=T sum=OK      (or sum=BAD)
 *
 * on COM1, N and T in hex. A resumed guest continues N with the same T and sum=OK;
 * a guest resumed on fresh RAM has lost this very code (it lived in RAM at 0x7c00)
 * and prints nothing more; a damaged region prints sum=BAD. A fresh boot prints
 * "boot token=T" first, with a new T.
 *
 * Build: as --32 -o tick.o tick.S && ld -m elf_i386 -Ttext 0x7c00 --oformat binary.
 */
	.code16
	.text
	.globl _start
_start:
	cli
	xorw	%ax, %ax
	movw	%ax, %ds
	movw	%ax, %ss
	movw	$0x7c00, %sp
	sti

	rdtsc
	xorl	%edx, %eax
	orl	$1, %eax
	movl	%eax, (TOKEN)
	movl	$0, (COUNT)

	/* fill: x = token; per dword: x = x*1103515245 + 12345; store x */
	movl	(TOKEN), %ebx
	movw	$0x1000, %cx
fill_seg:
	movw	%cx, %es
	xorw	%di, %di
fill_dw:
	imull	$1103515245, %ebx, %ebx
	addl	$12345, %ebx
	movl	%ebx, %es:(%di)
	addw	$4, %di
	jnz	fill_dw
	addw	$0x1000, %cx
	cmpw	$0x9000, %cx
	jne	fill_seg

	call	checksum
	movl	%eax, (SUM)

	movw	$msg_boot, %si
	call	puts
	movl	(TOKEN), %eax
	call	puthex
	call	newline

loop:
	/* wait for the BIOS tick counter (0x46c) to move */
	movw	(0x46c), %bx
wait:
	hlt
	cmpw	(0x46c), %bx
	je	wait

	incl	(COUNT)
	movw	$msg_tick, %si
	call	puts
	movl	(COUNT), %eax
	call	puthex
	movw	$msg_token, %si
	call	puts
	movl	(TOKEN), %eax
	call	puthex
	call	checksum
	movw	$msg_ok, %si
	cmpl	(SUM), %eax
	je	1f
	movw	$msg_bad, %si
1:	call	puts
	call	newline
	jmp	loop

/* eax = sum*31 + dword over every dword of the region (mod 2^32) */
checksum:
	xorl	%eax, %eax
	movw	$0x1000, %cx
sum_seg:
	movw	%cx, %es
	xorw	%di, %di
sum_dw:
	imull	$31, %eax, %eax
	addl	%es:(%di), %eax
	addw	$4, %di
	jnz	sum_dw
	addw	$0x1000, %cx
	cmpw	$0x9000, %cx
	jne	sum_seg
	ret

/* print the NUL-terminated string at ds:si */
puts:
	lodsb
	testb	%al, %al
	jz	2f
	call	putc
	jmp	puts
2:	ret

newline:
	movb	$'\r', %al
	call	putc
	movb	$'\n', %al
	jmp	putc

/* print eax as 8 hex digits */
puthex:
	movw	$8, %cx
	movl	%eax, %edx
3:	roll	$4, %edx
	movb	%dl, %al
	andb	$0xf, %al
	addb	$'0', %al
	cmpb	$'9', %al
	jbe	4f
	addb	$('a' - '0' - 10), %al
4:	call	putc
	loop	3b
	ret

/* al to COM1, waiting for the transmit holding register */
putc:
	pushw	%dx
	pushw	%ax
	movw	$0x3fd, %dx
5:	inb	%dx, %al
	testb	$0x20, %al
	jz	5b
	popw	%ax
	movw	$0x3f8, %dx
	outb	%al, %dx
	popw	%dx
	ret

msg_boot:	.asciz "boot token="
msg_tick:	.asciz "tick "
msg_token:	.asciz " token="
msg_ok:		.asciz " sum=OK"
msg_bad:	.asciz " sum=BAD"

	.equ	COUNT, 0x500
	.equ	TOKEN, 0x504
	.equ	SUM, 0x508

	.org	510
	.byte	0x55, 0xaa
