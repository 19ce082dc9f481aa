#!/usr/bin/env bash
# The linker for bpfel-unknown-none (see .cargo/config.toml). rustc passes bpf-linker the
# target's default `--cpu generic` (BPF v1), and aya-build owns RUSTFLAGS, so `-C target-cpu`
# cannot be set. Sluice's datapath needs BPF v3: atomic fetch-add/xchg on the shared
# connection counters (exact limits across CPUs). Rewrite the CPU and run bpf-linker.
set -eu
args=()
cpu_next=0
for a in "$@"; do
  if [ "$cpu_next" = 1 ]; then a=v3; cpu_next=0; elif [ "$a" = "--cpu" ]; then cpu_next=1; fi
  args+=("$a")
done
exec bpf-linker "${args[@]}"
