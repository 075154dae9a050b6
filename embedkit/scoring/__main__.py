"""`python -m embedkit.scoring INPUT OUTPUT --teacher KIND --model PATH`: teacher scores for KD.

Writes INPUT's FlagEmbedding rows to OUTPUT with `pos_scores` / `neg_scores` (embedkit/scoring/__init__.py).

Examples:
  python -m embedkit.scoring mined.jsonl scored.jsonl --teacher cross-encoder --model BAAI/bge-reranker-v2-m3
  python -m embedkit.scoring mined.jsonl scored.jsonl --teacher embedding --model <bge-large-zh-v1.5 folder> \\
      --query-instruction 为这个句子生成表示以用于检索相关文章：
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # as run.py: steady timings on small machines

import argparse  # noqa: E402
import sys  # noqa: E402

from embedkit.data.readers import BadRowError, EmptyFileError  # noqa: E402


def parser() -> argparse.ArgumentParser:
    from embedkit.scoring import ACTIVATIONS, RERANKER_MAX_LENGTH, TEACHERS

    p = argparse.ArgumentParser(prog="python -m embedkit.scoring", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Examples:" + __doc__.split("Examples:")[1])
    p.add_argument("input", help="FlagEmbedding jsonl: {query, pos, neg[, prompt]} per line")
    p.add_argument("output", help="where the rows with pos_scores / neg_scores go (may be INPUT)")
    p.add_argument("--teacher", required=True, choices=TEACHERS,
                   help="cross-encoder: a reranker (sentence-transformers CrossEncoder); embedding: "
                        "an embedkit or sentence-transformers model folder, scored by cosine")
    p.add_argument("--model", required=True, help="the teacher: a model folder (or a hub name for a cross-encoder)")
    p.add_argument("--batch-size", type=int, default=256,
                   help="pairs (cross-encoder) or texts (embedding) per forward pass; changes no score "
                        "(default: 256)")
    p.add_argument("--max-length", type=int, default=None,
                   help=f"tokens per pair (cross-encoder; default {RERANKER_MAX_LENGTH}, as FlagEmbedding's "
                        f"add_reranker_score.py) or per text (embedding; default the model's own)")
    p.add_argument("--query-instruction", default=None,
                   help="put in front of every query; for an embedding teacher a row's own `prompt` "
                        "replaces it (default: none)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda when there is one)")
    p.add_argument("--activation", choices=ACTIVATIONS, default=None,
                   help="cross-encoder only: none = raw logits, as FlagEmbedding stores them (default); "
                        "sigmoid = its normalize=True")
    p.add_argument("--pooling", choices=("cls", "mean"), default=None,
                   help="embedding teacher only: replace the checkpoint's own pooling (default: keep it)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    from embedkit.scoring import build_teacher, score_file

    for name in ("batch_size", "max_length"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser().error(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    try:
        teacher = build_teacher(args.teacher, args.model, batch_size=args.batch_size,
                                max_length=args.max_length, query_instruction=args.query_instruction,
                                device=args.device, activation=args.activation, pooling=args.pooling)
        n = score_file(args.input, args.output, teacher, show_progress=not args.no_progress)
    except (BadRowError, EmptyFileError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    print(f"wrote {n} rows with pos_scores / neg_scores to {args.output}")
    return 0


if __name__ == "__main__":
    main()
