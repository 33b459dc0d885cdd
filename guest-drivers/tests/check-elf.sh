#!/bin/sh
# Static checks of the guest ELFs against ABI.md: static x86-64 executable,
# entry at the start of the image, every PT_LOAD at or above 0x200000 with
# p_paddr == p_vaddr, no dynamic section or interpreter, no relocations, no
# undefined symbols, no SSE/MMX/AVX/x87 register and no instruction that
# faults at CPL3 (hlt, cli/sti, privileged moves, MSRs, descriptor tables).
set -eu
status=0
for elf in "$@"; do
    before=$status
    err() { echo "check-elf: $elf: $*" >&2; status=1; }
    hdr=$(readelf -h "$elf")
    echo "$hdr" | grep -q 'Type:.*EXEC' || err "not an ET_EXEC"
    echo "$hdr" | grep -q 'Machine:.*X86-64' || err "not x86-64"
    entry=$(echo "$hdr" | awk '/Entry point/ {print $4}')
    [ "$(printf '%d' "$entry")" -ge $((0x200000)) ] || err "entry $entry below 0x200000"
    readelf -lW "$elf" | grep -qE '^ *(INTERP|DYNAMIC) ' && err "has a dynamic section or an interpreter"
    readelf -lW "$elf" | awk '$1 == "LOAD" {print $3, $4}' | while read -r vaddr paddr; do
        [ $((vaddr)) -ge $((0x200000)) ] || echo "PT_LOAD at $vaddr, below 0x200000" >&2
        [ "$vaddr" = "$paddr" ] || echo "PT_LOAD p_vaddr $vaddr != p_paddr $paddr" >&2
    done 2>&1 | grep . >&2 && err "program headers"
    [ -z "$(readelf -rW "$elf" | grep -i 'Relocation section' || true)" ] || err "has relocations"
    und=$(nm -u "$elf" || true)
    [ -z "$und" ] || err "undefined symbols: $und"
    dis=$(objdump -d --no-show-raw-insn "$elf")
    bad=$(echo "$dis" | grep -E '%(x|y|z)mm[0-9]|%mm[0-7]|%st(\(|\b)|\b(f(ld|st|add|mul|div|init|xsave|xrstor|nstenv)|emms)\b' || true)
    [ -z "$bad" ] && : || err "FP/vector instructions: $(echo "$bad" | head -3)"
    priv=$(echo "$dis" | grep -E '\s(hlt|cli|sti|lgdt|lidt|ltr|lldt|wrmsr|rdmsr|invlpg|iretq|sysretq?|swapgs|clts|wbinvd|invd)\b|mov\s+%?cr[0-9]|%cr[0-9]|%db[0-7]' || true)
    [ -z "$priv" ] || err "instructions that fault at CPL3: $(echo "$priv" | head -3)"
    [ "$(objdump -d "$elf" | awk '/<_start>:/ {print $1}')" = "$(printf '%016x' "$entry")" ] || err "entry is not _start"
    [ "$status" != "$before" ] || echo "check-elf: $elf ok (entry $entry, $(stat -c %s "$elf") bytes)"
done
exit $status
