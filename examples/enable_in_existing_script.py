"""An ordinary HF LLaVA generation script; vtok is enabled by ONE added line (marked below).

    python examples/enable_in_existing_script.py --model llava-hf/llava-1.5-7b-hf --image cat.jpg \
        --prompt "USER: <image> what is in the image ? ASSISTANT:" --vtok fastv --vtok-arg retain=0.25
    python examples/enable_in_existing_script.py --model ... --no-vtok      # the untouched model

--model is a local directory (or a hub id where a hub is reachable).
"""

import argparse

import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

import vtok


def parse_value(text):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--image", default=None, help="image file (default: a gray test image)")
    p.add_argument("--prompt", default="USER: <image> what is in the image ? ASSISTANT:")
    p.add_argument("--max-new-tokens", type=int, default=20)
    p.add_argument("--vtok", default="fastv", help="vtok method name")
    p.add_argument("--vtok-arg", action="append", default=[], help="hyper-parameter, e.g. retain=0.25")
    p.add_argument("--no-vtok", action="store_true", help="run the untouched model")
    args = p.parse_args(argv)

    processor = AutoProcessor.from_pretrained(args.model)
    model = LlavaForConditionalGeneration.from_pretrained(args.model, attn_implementation="sdpa").eval()
    image = Image.open(args.image).convert("RGB") if args.image else Image.new("RGB", (64, 64), (128, 128, 128))
    inputs = processor(images=image, text=args.prompt, return_tensors="pt")

    # ---- the one added line ----
    handle = None if args.no_vtok else vtok.apply(model, args.vtok, **dict((k, parse_value(v)) for k, v in (a.split("=", 1) for a in args.vtok_arg)))

    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
    text = processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0]
    print(text)
    if handle is not None:
        print(handle.stats)
    return out


if __name__ == "__main__":
    main()
