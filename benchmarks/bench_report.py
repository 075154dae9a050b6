"""benchmarks/RESULTS.md from the raw results of benchmarks/bench_contrastive.py (its .json)."""

from __future__ import annotations

from interleave import paired_ratios, quantile, spread, verdict

TARGET = 1.5


def _median_rate(results, group, member) -> float | None:
    xs = [r["samples_per_s"] for r in results if r["group"] == group and r["member"] == member]
    return quantile(xs, 0.5) if xs else None


def _median_of(results, group, member, key) -> float | None:
    xs = [r[key] for r in results if r["group"] == group and r["member"] == member and r.get(key) is not None]
    return quantile(xs, 0.5) if xs else None


def _first(results, group, member, key):
    for r in results:
        if r["group"] == group and r["member"] == member and key in r:
            return r[key]
    return None


def _stats(results, group, member, reference):
    ratios = paired_ratios([r for r in results if r["group"] == group], member, reference)
    return (spread(ratios), ratios) if ratios else (None, [])


def _fmt_spread(s) -> tuple[str, str, str]:
    return f"{s['median']:.2f}", f"{s['q1']:.2f}–{s['q3']:.2f}", f"{s['min']:.2f}–{s['max']:.2f}"


def _show(v) -> str:
    if isinstance(v, str):
        return v
    return "on" if v else "off"


def report(raw: dict) -> str:
    info, settings, data, results = raw["machine"], raw["settings"], raw["data"], raw["results"]
    v = info["versions"]
    loads = [r["load_avg_1min"] for r in results] or [info["load_avg_at_start"][0]]
    lines = [
        "# Contrastive training benchmark: embedkit vs sentence-transformers, interleaved",
        "",
        *(["**Not a full run** (" + ("--quick: tiny sizes" if settings["quick"] else
           f"{settings['repeats']} rounds of {settings['seconds']:g} s") + "): these numbers only "
           "show that every configuration runs.", ""] if not settings["full"] else []),
        f"Written by `{settings['command']}` in one run of {info['bench_minutes']:.1f} min. "
        f"**Machine:** {info['cpu']}, {info['cores']} cores, {info['ram_gib']:.1f} GiB RAM, torch "
        f"threads {info['torch_threads']}, Python {info['python']}; "
        + ", ".join(f"{k} {x}" for k, x in v.items()) + ".",
        "",
        f"The machine is shared (1-minute load average {min(loads):.2f}–{max(loads):.2f} at the "
        f"starts of the measurements, {info['load_avg_at_start'][0]:.2f} at the start of the run, "
        f"{info['load_avg_at_end'][0]:.2f} at its end), so absolute numbers drift; a ratio compares "
        f"two measurements of one round, minutes apart at most. Each group of configurations is measured in "
        f"{settings['repeats']} rounds, every member once per round for {settings['seconds']:g} s "
        f"of training (after {settings['warmup']} untimed step; each configuration was built and "
        f"run {settings['first_warmup']} steps untimed before its first round), the order "
        f"alternating between rounds (A B C, C B A). A ratio is the median of the per-round "
        f"ratios; IQR is their quartiles, min–max their range.",
        "",
        f"**Data:** {data['pairs']:,} real pairs (query and first positive of every row of zh-mini's "
        + ", ".join(f"`{f}`" for f in data["files"]) + ", de-duplicated: no text twice), mixed "
        f"lengths: {data['tokens_mean']:.1f} tokens per text on average, "
        f"{100 * data['tokens_at_cap']:.1f} % cut at the cap of 128. Both sides pad each batch to "
        "its longest text. embedkit serves the batches of its data module (pre-tokenised; "
        "length-grouped when `data.group_by_length` is on, its default), sentence-transformers "
        "those of its trainer's default batch sampler (random, tokenised per batch).",
        "",
        "**Model and training:** tiny_zh-sized BERT (hidden 128, 2 layers, 2 heads, FFN 512, "
        "dropout 0.1, mean pooling, vocabulary "
        f"{data['vocab']:,}), loaded by both sides from one exported folder. InfoNCE τ = 0.05 = "
        "MultipleNegativesRankingLoss scale 20, in-batch negatives only; AdamW lr 1e-4, weight "
        "decay 0, clip 1.0, float32. Samples/s: timed steps × batch over their time, data loading "
        "included. Token slots: padded width × rows, queries and passages, per training pair.",
        "",
        "embedkit's fast-path defaults (conf/): " + ", ".join(
            f"{raw['fast_paths'][k][1]} = {_show(raw['defaults'][k])}" for k in raw["fast_paths"]) + ".",
        "",
    ]
    main_groups = [g for g in raw["groups"] if g["section"] == "main"]
    met = []
    if main_groups:
        lines += ["## 1. Training throughput at equal batch: embedkit (defaults) vs sentence-transformers", "",
                  "| batch | embedkit samples/s | ST samples/s | ratio ours/theirs | IQR | min–max | rounds "
                  "| token slots per pair, embedkit / ST | real tokens in the slots, embedkit / ST |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for g in main_groups:
            s, _ = _stats(results, g["name"], "embedkit", "st")
            if s is None:
                continue
            med, iqr, rng = _fmt_spread(s)
            batch = g["members"]["embedkit"]["batch"]
            ek_slots, st_slots = (_median_of(results, g["name"], m, "slots_per_sample") for m in ("embedkit", "st"))
            ek_real, st_real = (_median_of(results, g["name"], m, "real_share") for m in ("embedkit", "st"))
            lines.append(f"| {batch} | {_median_rate(results, g['name'], 'embedkit'):.1f} | "
                         f"{_median_rate(results, g['name'], 'st'):.1f} | **{med}** | {iqr} | {rng} | {s['n']} | "
                         f"{ek_slots:.0f} / {st_slots:.0f} | {100 * ek_real:.0f} % / {100 * st_real:.0f} % |")
            met.append((batch, s))
        opts = {m: _first(results, g["name"], m, "optimizer") for g in main_groups[:1] for m in ("embedkit", "st")}
        lines += ["", f"Optimisers as run: embedkit {opts['embedkit']}, sentence-transformers {opts['st']} "
                  "(its trainer's default).", ""]

    fast = [g for g in raw["groups"] if any(c[2] not in ("st",) for c in g["comparisons"])]
    for g in fast:
        lines += [f"## 2. Fast paths at {g['name']}, measured in the same rounds", "",
                  "Each row flips one switch from embedkit's default; \"on/off\" is the speed with the "
                  "switch on over the speed with it off, per round.", "",
                  "| fast path (config key) | default | on/off ratio | IQR | min–max | rounds | reads "
                  "| flipped config vs ST |",
                  "|---|---|---:|---:|---:|---:|---|---:|"]
        notes = []
        for member, reference, switch in g["comparisons"]:
            if switch == "st":
                continue
            what, key = raw["fast_paths"][switch]
            s, ratios = _stats(results, g["name"], member, reference)
            if s is None:
                continue
            default_on = _is_on(switch, raw["defaults"][switch])
            on_off = [1 / x for x in ratios] if default_on else ratios
            st = spread(on_off)
            med, iqr, rng = _fmt_spread(st)
            reads = verdict(st)
            vs_st, _ = _stats(results, g["name"], member, "st")
            lines.append(f"| {what} (`{key}`) | {_show(raw['defaults'][switch])} | **{med}** | {iqr} | {rng} | "
                         f"{st['n']} | {reads}{_consistency(reads, default_on)} | "
                         + (f"{vs_st['median']:.2f} |" if vs_st else " |"))
            if switch == "compile":
                comp = member if not default_on else reference
                plain = reference if not default_on else member
                cs, ps = (_first(results, g["name"], m, "startup_s") for m in (comp, plain))
                if cs is not None and ps is not None:
                    notes.append(f"torch.compile's one-time cost: the compiled configuration's first "
                                 f"{settings['first_warmup']} steps (build included) took {cs:.0f} s, "
                                 f"the plain one's {ps:.0f} s.")
            if switch == "attn" and reference != "embedkit":
                notes.append("SDPA vs eager is compared with unpadded encoding off in both (unpadded "
                             "encoding runs its own attention).")
        lines += [""] + [f"- {n}" for n in notes] + ([""] if notes else [])

    enc = next((g for g in raw["groups"] if g["section"] == "encode"), None)
    if enc:
        s, _ = _stats(results, enc["name"], "embedkit", "st")
        spec = enc["members"]["embedkit"]
        med, iqr, rng = _fmt_spread(s)
        lines += ["## 3. Encoding throughput (evaluation): TextEncoder.encode vs SentenceTransformer.encode", "",
                  "| texts | batch | max len | embedkit texts/s | ST texts/s | ratio | IQR | min–max | rounds |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
                  f"| {spec['texts']:,} | {spec['batch']} | {spec['max_len']} | "
                  f"{_median_rate(results, enc['name'], 'embedkit'):.1f} | {_median_rate(results, enc['name'], 'st'):.1f} | "
                  f"**{med}** | {iqr} | {rng} | {s['n']} |", "",
                  "Both sort texts by length before batching; a measurement is whole passes over the "
                  f"texts for at least {max(1.0, settings['seconds'] / 3):g} s.", ""]

    gcs = [g for g in raw["groups"] if g["section"] == "gradcache"]
    for g in gcs:
        s, _ = _stats(results, g["name"], "embedkit", "st")
        med, iqr, rng = _fmt_spread(s)
        spec = g["members"]["embedkit"]
        lines += ["## 4. GradCache vs CachedMultipleNegativesRankingLoss", "",
                  "| batch | mini-batch | embedkit samples/s | ST samples/s | ratio | IQR | min–max | rounds |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|",
                  f"| {spec['batch']} | {spec['grad_cache']} | {_median_rate(results, g['name'], 'embedkit'):.1f} | "
                  f"{_median_rate(results, g['name'], 'st'):.1f} | **{med}** | {iqr} | {rng} | {s['n']} |", ""]

    if raw.get("memory"):
        lines += ["## 5. Memory: a huge batch with GradCache (fresh process each, max length 32)", "",
                  "| configuration | steps | samples/s | peak RSS MiB | RSS before training MiB |",
                  "|---|---:|---:|---:|---:|"]
        for m in raw["memory"]:
            rate = f"{m['samples_per_s']:.1f}" if "samples_per_s" in m else ""
            lines.append(f"| {m['label']} | {m['steps']} | {rate} | {m['peak_rss_mib']:.0f} | "
                         f"{m['rss_before_train_mib']:.0f} |")
        big, small = raw["memory"][0], raw["memory"][1]
        r = big["peak_rss_mib"] / small["peak_rss_mib"]
        lines += ["", f"Batch {big['batch']:,} with GradCache peaks at {r:.2f}× the RSS of the uncached "
                  f"batch {small['batch']} (target ≤ 1.3×: **{'met' if r <= 1.3 else 'not met'}**). "
                  f"Rows are repeated to reach {big['batch']:,} (the pairs are fewer); memory does "
                  "not depend on which rows.", ""]

    lines += ["## Targets", ""]
    if met:
        ok = all(s["median"] >= TARGET for _, s in met)
        lines.append(f"- Training samples/s ≥ {TARGET}× sentence-transformers at equal batch and model: "
                     + "; ".join(f"batch {b}: median {s['median']:.2f} (IQR {s['q1']:.2f}–{s['q3']:.2f}, "
                                 f"min {s['min']:.2f})" for b, s in met)
                     + f" → **{'met' if ok else 'not met'}**"
                     + ("" if ok else f" (met at {sum(s['median'] >= TARGET for _, s in met)} of {len(met)} batch sizes)")
                     + (", in every round" if ok and all(s["min"] >= TARGET for _, s in met) else "") + ".")
    else:
        lines.append("- The main section was not run: no training target is judged here.")
    lines += ["", f"Reproduce: `make bench` (`{settings['command']}`; about {info['bench_minutes']:.0f} min "
              "here). Raw numbers, every round: the .json beside this file.", ""]
    return "\n".join(lines)


def _is_on(switch: str, value) -> bool:
    return value == "sdpa" if switch == "attn" else value not in (False, None)


def _consistency(reads: str, default_on: bool) -> str:
    if reads == "pays":
        return "; kept on" if default_on else "; **the default is off**"
    if default_on:
        return "; **the default is on without a measured gain**"
    return "; kept off"
