#!/usr/bin/env python
"""Judge a pipeline on held-out shapes prompts: per-attribute accuracy (JSON + table) and an example sheet.

    python scripts/eval_shapes.py --ckpt outputs/quickstart/pipeline --count 200 --out outputs/eval_shapes
    python scripts/eval_shapes.py --ckpt DIR --top-k 0 --compare-sampler     # with and without the sampler head
    python scripts/eval_shapes.py --ckpt DIR --no-sampler --forced-scales 0,3,5  # where accuracy is lost

Prompts: the first --count held-out prompts (half one-object, half two-object with a relation), fixed seeds.
Sampling settings not given on the command line are the pipeline's own defaults (config.json "generation");
the sampler head is used when the pipeline has one (--no-sampler: the backbone's own sampling).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing

from metrics.shapes_eval import evaluate_pipeline, examples_sheet  # noqa: E402
from metrics.shapes_judge import format_table, paired_comparison  # noqa: E402
from models.pipeline import StarPipeline  # noqa: E402
from utils import cli  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="pipeline directory")
    p.add_argument("--device", type=cli.device_arg, default=cli.default_device())
    p.add_argument("--out", type=Path, default=Path("outputs/eval_shapes"))
    p.add_argument("--count", type=cli.positive_int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cfg", type=float, help="default: the pipeline's (config.json 'generation')")
    p.add_argument("--top-k", type=int, help="0 = the whole vocabulary (default: the pipeline's)")
    p.add_argument("--top-p", type=float, help="0 = off (default: the pipeline's)")
    p.add_argument("--guidance", help="linear | constant | window:i:j | t0,t1,... (default: the pipeline's)")
    p.add_argument("--batch-size", type=cli.positive_int, default=16)
    p.add_argument("--no-sampler", action="store_true")
    p.add_argument("--compare-sampler", action="store_true", help="run with and without the sampler head")
    p.add_argument("--forced-scales", default="",
                   help="diagnosis, comma-separated K values: one run per K in which scales < K are the VQ-VAE "
                        "tokens of each prompt's rendered reference image and the model generates the rest "
                        "(which scales lose accuracy; K = number of scales gives the reconstructions)")
    args = p.parse_args(argv)
    pipe = StarPipeline.from_pretrained(args.ckpt, device=args.device)
    if args.compare_sampler and pipe.sampler is None:
        raise cli.InputError(f"{args.ckpt} has no sampler head to compare with")
    args.out.mkdir(parents=True, exist_ok=True)
    runs = {"with_sampler": (True, 0), "without_sampler": (False, 0)} if args.compare_sampler else \
        {"result": (not args.no_sampler and pipe.sampler is not None, 0)}  # the head when there is one
    if args.forced_scales:
        try:
            forced = [int(k) for k in args.forced_scales.split(",")]
        except ValueError:
            raise cli.InputError(f"--forced-scales takes comma-separated integers, got {args.forced_scales!r}") \
                from None
        if any(not 0 <= k <= pipe.star.num_scales for k in forced):
            raise cli.InputError(f"--forced-scales values must lie in 0..{pipe.star.num_scales}, got {forced}")
        runs = {f"{name}_forced{k}": (use_sampler, k) for name, (use_sampler, _) in runs.items() for k in forced}
    sampling = pipe.generation_settings(cfg=args.cfg, top_k=args.top_k, top_p=args.top_p,
                                        guidance_schedule=args.guidance)
    report: dict = {"settings": {k: str(v) for k, v in vars(args).items()}, "sampling": sampling}
    for name, (use_sampler, forced_scales) in runs.items():
        start = time.perf_counter()
        res = evaluate_pipeline(pipe, args.count, args.seed, args.batch_size, forced_scales, **sampling,
                                use_sampler=use_sampler)
        report[name] = {"summary": res["summary"], "seconds": time.perf_counter() - start, "use_sampler": use_sampler,
                        "prompts": [{"prompt": r["prompt"], "kind": r["kind"], **r["verdict"]} for r in res["rows"]]}
        examples_sheet(res["images"], res["rows"], args.out / f"examples_{name}.png")
        print(f"== {name}\n{format_table(res['summary'])}")
    if args.compare_sampler and not args.forced_scales:  # same prompts and seeds: compare prompt by prompt
        with_rows, without_rows = report["with_sampler"]["prompts"], report["without_sampler"]["prompts"]
        report["paired"] = paired_comparison(with_rows, without_rows, [r["kind"] for r in with_rows])
        print("== with minus without sampler (McNemar exact p)")
        for group, res in report["paired"].items():
            print(f"{group:<8} " + "  ".join(f"{k} {v['difference']:+.3f} (p={v['p_value']:.2g})"
                                             for k, v in res.items()))
    # The judge's verdicts are numpy booleans: .item() makes them JSON.
    (args.out / "judge.json").write_text(json.dumps(report, indent=2, default=lambda o: o.item()))
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
