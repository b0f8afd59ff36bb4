# Sourced by the CPU quality sweeps (hess_shrink_sweep.sh, distill_shrink_cpu.sh): mean KLD of a GGUF
# against the F32 model on each text of $DOMAINS, from llama-perplexity --kl-divergence on 20 x 512 tokens.
# Needs B (llama.cpp's tools), C (where base_$d.kld lives), F (the F32 model), D (the texts), DOMAINS.

kld_bases() {   # the F32 model's logits on each domain, once
  local d
  for d in $DOMAINS; do
    [ -s "$C/base_$d.kld" ] || $B/llama-perplexity -m "$F" -f "$D/$d.txt" -c 512 --chunks 20 -t 2 \
      --kl-divergence-base "$C/base_$d.kld" > "$C/base_$d.log" 2>&1
  done
}

kld_line() {   # FILE: "  tutorial KLD +- SE  sysadmin ..." (each domain's log cached beside FILE)
  local f=$1 d line=""
  for d in $DOMAINS; do
    [ -s "$f.$d.log" ] || $B/llama-perplexity -m "$f" -f "$D/$d.txt" -c 512 --chunks 20 -t 2 \
      --kl-divergence-base "$C/base_$d.kld" --kl-divergence > "$f.$d.log" 2>&1
    line="$line  $d $(grep -m1 'Mean    KLD' "$f.$d.log" | awk '{print $3, "+-", $5}')"
  done
  echo "$line"
}
