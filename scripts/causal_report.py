#!/usr/bin/env python3
"""How often is the neuron map's top neuron also the causal top? And do phrase neurons make the
model say the whole phrase? Runs `flash-interp verify` (and `generate` with the best clamp) for a
fixed list of concepts on one model and prints a Markdown report.

    python3 scripts/causal_report.py [--bin target/release/flash-interp] [--model PATH] [--json OUT]
"""
import argparse
import json
import subprocess
import sys

# (concept, phrase?, prompts): prompts after which the concept could plausibly come next.
CONCEPTS = [
    (" dog", False, ["My favourite animal is the", "She took her pet for a walk, her"]),
    (" cat", False, ["My favourite animal is the", "The mouse ran away from the"]),
    (" Paris", False, ["The capital of France is", "Last summer we flew to"]),
    (" music", False, ["In the evening I like to listen to", "She studied piano and"]),
    (" water", False, ["When I am thirsty I drink", "The river was full of"]),
    (" red", False, ["The colour of blood is", "Her favourite colour is"]),
    (" king", False, ["The castle belonged to the", "Long ago there lived a"]),
    (" happy", False, ["After the good news she felt", "The children were very"]),
    (" computer", False, ["He wrote the program on his", "To send an email you need a"]),
    (" food", False, ["We were hungry, so we bought some", "The restaurant serves Italian"]),
    (" Sherlock Holmes", True, ["The famous detective is", "My favourite book character is"]),
    (" New York", True, ["The biggest city in America is", "Last year I visited"]),
    (" ice cream", True, ["On a hot day I like to eat", "For dessert we had"]),
    (" social security", True, ["When you retire you receive", "The government pays"]),
    (" United States", True, ["The president of the", "Washington is the capital of the"]),
]


def run(cmd):
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return out.stdout


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="target/release/flash-interp")
    ap.add_argument("--model")
    ap.add_argument("--candidates", type=int, default=8)
    ap.add_argument("--json")
    a = ap.parse_args()
    base = [a.bin] + (["--model", a.model] if a.model else [])
    rows = []
    for concept, phrase, prompts in CONCEPTS:
        cmd = base + ["--json", "verify", concept, "--no-chat", "--candidates", str(a.candidates)]
        cmd += ["--phrase"] if phrase else []
        for p in prompts:
            cmd += ["-p", p]
        r = json.loads(run(cmd))
        ns = r["neurons"]
        map_top = min(ns, key=lambda n: n["map_rank"])
        causal = ns[0]
        row = {
            "concept": concept, "phrase": phrase, "baseline": r["baseline"],
            "map_top": f'{map_top["layer"]}:{map_top["neuron"]}', "map_top_effect": map_top["effect"],
            "causal_top": f'{causal["layer"]}:{causal["neuron"]}', "causal_map_rank": causal["map_rank"],
            "causal_effect": causal["effect"], "best_value": causal["best_value"], "best_prob": causal["best_prob"],
            "agree": map_top is causal,
        }
        if phrase:
            # Does clamping the causal top make the model say the whole phrase (greedy, plain text)?
            clamp = f'{causal["layer"]}:{causal["neuron"]}:{causal["best_value"]:.2f}'
            said = []
            for p in prompts:
                g = json.loads(run(base + ["--json", "generate", "--no-chat", "-p", p, "--clamp", clamp, "--compare", "--max-tokens", "12"]))
                texts = {c["variant"]: c["text"] for c in g["completions"]}
                said.append((concept.strip() in texts["normal"], concept.strip() in texts["steered"], texts["steered"].strip()[:60]))
            row["says_phrase"] = said
        rows.append(row)
        print(f"{concept!r}: map top {row['map_top']} ({row['map_top_effect']:+.2f} nats), "
              f"causal top {row['causal_top']} (map rank {row['causal_map_rank']}, {row['causal_effect']:+.2f} nats)", file=sys.stderr)
    agree = sum(r["agree"] for r in rows)
    print(f"map top = causal top for {agree} of {len(rows)} concepts\n")
    print("| concept | p unclamped | map top (effect) | causal top (map rank, effect, clamp, p) |")
    print("| --- | --- | --- | --- |")
    for r in rows:
        print(f'| `{r["concept"]}`{" (phrase)" if r["phrase"] else ""} | {r["baseline"]:.4f} | {r["map_top"]} ({r["map_top_effect"]:+.2f}) '
              f'| {r["causal_top"]} ({r["causal_map_rank"]}, {r["causal_effect"]:+.2f}, {r["best_value"]:.1f}, {r["best_prob"]:.3f}) |')
    for r in rows:
        if r.get("says_phrase"):
            for normal, steered, text in r["says_phrase"]:
                print(f'- `{r["concept"]}` clamped {r["causal_top"]}: normal says it: {normal}; steered says it: {steered} — "{text}"')
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
