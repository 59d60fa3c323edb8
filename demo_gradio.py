#!/usr/bin/env python
"""A web demo of a STAR pipeline (Gradio).

    python demo_gradio.py --ckpt outputs/quickstart/pipeline            # http://127.0.0.1:7860
    python demo_gradio.py --ckpt star.pth --preset star-d30-1024 --vae vae.pth \\
        --text-encoder hf-clip --text-encoder-path /models/clip-vit-h --device cuda
    python demo_gradio.py                                               # embedded random tiny model

Binds 127.0.0.1 unless --host says otherwise (--share opens a public Gradio link). Requests are queued and
run one at a time; --max-images caps the images per request.
"""
from __future__ import annotations

import argparse
import random
import time

import gradio as gr

from models.pipeline import StarPipeline, add_pipeline_args, check_seed
from utils import cli

TINY_NOTE = ("**Note:** no checkpoint was given, so this demo runs the *embedded tiny model* with random weights: "
             "the images are noise. Start it with `--ckpt DIR` to use a trained pipeline.")


def build_demo(pipe: StarPipeline, note: str = "", max_images: int = 4) -> gr.Blocks:
    vocab = pipe.star.cfg.vocab_size
    has_sampler = pipe.sampler is not None

    def generate(prompt, negative, cfg, top_k, top_p, seed, randomize, use_sampler, num_images, image, mask):
        if not prompt or not prompt.strip():
            raise gr.Error("Enter a prompt.")
        if (image is None) != (mask is None):
            raise gr.Error("Editing needs both an image and a mask (white = regenerate).")
        seed = random.randrange(2 ** 31) if randomize or seed is None else int(seed)  # a cleared box: a new one
        try:
            check_seed(seed)
        except ValueError as e:
            raise gr.Error(str(e)) from None
        kwargs = dict(negative_prompt=negative or "", cfg=float(cfg), top_k=int(top_k), top_p=float(top_p),
                      seed=seed, use_sampler=bool(use_sampler) and has_sampler,
                      num_images=max(1, min(int(num_images), max_images)))
        start = time.perf_counter()
        images = pipe.edit(prompt, image, mask, **kwargs) if image is not None else pipe(prompt, **kwargs)
        took = time.perf_counter() - start
        return images, f"{len(images)} image(s) in {took:.2f} s · seed {seed}", seed

    with gr.Blocks(title="STAR text-to-image") as demo:
        gr.Markdown("# STAR: scale-wise text-to-image generation")
        if note:
            gr.Markdown(note, elem_id="model-note")
        with gr.Row():
            with gr.Column():
                prompt = gr.Textbox(label="Prompt", value="a red circle at the top left")
                negative = gr.Textbox(label="Negative prompt", value="")
                defaults = pipe.generation  # the pipeline's own sampling defaults (official: 4.0 / 900 / 0.95)
                cfg = gr.Slider(0.0, 20.0, value=defaults["cfg"], step=0.1, label="CFG")
                top_k = gr.Slider(0, vocab, value=min(defaults["top_k"], vocab), step=1, label="Top-k (0 = off)")
                top_p = gr.Slider(0.0, 1.0, value=defaults["top_p"], step=0.01, label="Top-p (0 = off)")
                with gr.Row():
                    seed = gr.Number(value=0, precision=0, label="Seed")
                    randomize = gr.Checkbox(value=False, label="Randomise seed")
                use_sampler = gr.Checkbox(value=has_sampler, interactive=has_sampler,
                                          label="Sampler head" + ("" if has_sampler else " (not in this checkpoint)"))
                num_images = gr.Slider(1, max_images, value=1, step=1, label="Images")
                with gr.Accordion("Edit an image (in/out-painting)", open=False):
                    image = gr.Image(type="pil", label="Image")
                    mask = gr.Image(type="pil", image_mode="L", label="Mask (white = regenerate)")
                run = gr.Button("Generate", variant="primary")
            with gr.Column():
                gallery = gr.Gallery(label="Images", columns=2, height=512)
                info = gr.Markdown()
        run.click(generate, [prompt, negative, cfg, top_k, top_p, seed, randomize, use_sampler, num_images, image,
                             mask], [gallery, info, seed], api_name="generate")
    return demo


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_pipeline_args(p, "our pipeline directory or an official .pth (with --preset); "
                         "omitted: the embedded random tiny model")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default: this machine only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--share", action="store_true", help="also open a public Gradio share link")
    p.add_argument("--max-images", type=cli.positive_int, default=4, help="largest batch one request may ask for")
    p.add_argument("--queue-size", type=cli.positive_int, default=16, help="requests waiting beyond this are refused")
    args = p.parse_args(argv)
    if args.ckpt is None:
        pipe, note = StarPipeline.tiny_random(device=args.device), TINY_NOTE
    else:
        pipe, note = StarPipeline.from_args(args), ""
    demo = build_demo(pipe, note, args.max_images)
    demo.queue(max_size=args.queue_size, default_concurrency_limit=1)
    demo.launch(server_name=args.host, server_port=args.port, share=args.share)
    return 0


if __name__ == "__main__":
    raise SystemExit(cli.run(main))
