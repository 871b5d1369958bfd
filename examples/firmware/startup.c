/* Minimal start-up code for a Cortex-M4F under QEMU, linked with mpq's <board>.ld (its symbols
 * _sidata, _sdata, _edata, _sbss, _ebss, _estack) and newlib's rdimon semihosting. */
#include <stdint.h>
#include <stdlib.h>
#include <unistd.h>

extern uint32_t _sidata, _sdata, _edata, _sbss, _ebss, _estack;
extern int main(void);
extern void initialise_monitor_handles(void); /* librdimon: opens stdin/stdout/stderr */

void Reset_Handler(void);
void Fault_Handler(void);

/* QEMU, like the core, reads the initial SP and the reset vector from address 0; the linker
 * script puts .isr_vector there. No interrupt is enabled, so the 16 system vectors suffice. */
__attribute__((section(".isr_vector"), used)) static const void *const vectors[16] = {
    &_estack, (void *)Reset_Handler, (void *)Fault_Handler, (void *)Fault_Handler,
    (void *)Fault_Handler, (void *)Fault_Handler, (void *)Fault_Handler, 0, 0, 0, 0,
    (void *)Fault_Handler, (void *)Fault_Handler, 0, (void *)Fault_Handler,
    (void *)Fault_Handler,
};

void Reset_Handler(void)
{
    /* Full access to the FPU (CP10/CP11) before any hard-float code runs. */
    *(volatile uint32_t *)0xE000ED88u |= 0xFu << 20;
    __asm__ volatile("dsb\n\tisb" ::: "memory");

    const uint32_t *src = &_sidata;
    for (uint32_t *dst = &_sdata; dst < &_edata;) {
        *dst++ = *src++;
    }
    for (uint32_t *dst = &_sbss; dst < &_ebss;) {
        *dst++ = 0u;
    }
    initialise_monitor_handles();
    exit(main()); /* semihosting exit: QEMU ends with main's return value */
}

/* Any fault or unexpected exception ends the run with status 99 instead of hanging QEMU. */
void Fault_Handler(void)
{
    _exit(99);
}
