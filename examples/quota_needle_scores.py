"""Does QuoTA's default scorer find the relevant frame? On the video-needle questions (T frames of a real clip with
one easy-VQA image inserted; the question is about that image), the offline demo VLM itself is asked, frame by
frame, whether the frame helps to answer (P("Yes")); this prints how often the inserted frame scores highest and
its mean rank.

    python examples/quota_needle_scores.py --n 100 --frames 16
"""

from __future__ import annotations

import argparse

import torch
from tqdm.auto import tqdm

import vtok


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    from vtok.eval import datasets
    from vtok.eval.harnesses import frame_inputs
    from vtok.methods.quota import QuoTA

    model = datasets.load_model("offline-vlm")
    ds = datasets.load_dataset("video-needle", model, n=args.n, seed=args.seed, frames=args.frames)
    seen: list = []

    def recording(frames, questions, ask):  # the default scorer, recorded
        scores = QuoTA.ask_scores(method, frames, questions, ask)
        seen.append(scores)
        return scores

    method = QuoTA(retain=0.25, scorer=recording)
    top, ranks = 0, []
    with vtok.apply(model, method, processor=ds.helper.processor), torch.no_grad():
        for i in tqdm(range(len(ds)), desc="needle questions"):
            frames = ds.sample_frames(i)
            needle = ds.image(i).tobytes()
            at = next(j for j, f in enumerate(frames) if f.tobytes() == needle)
            seen.clear()
            model(**frame_inputs(ds.helper, [frames], [ds.items[i][0]]), logits_to_keep=1)
            (scores,) = seen[0]
            s = torch.tensor([float(x) for x in scores])
            top += int(int(s.argmax()) == at)
            ranks.append(int((s > s[at]).sum()) + 1)
    n = len(ds)
    print(f"QuoTA's default scorer on {n} video-needle questions, {args.frames} frames: the inserted frame scores "
          f"highest in {top}/{n} ({100 * top / n:.1f}%); its mean rank {sum(ranks) / n:.2f} of {args.frames} "
          f"(chance: {100 / args.frames:.1f}%, rank {(args.frames + 1) / 2:.1f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
