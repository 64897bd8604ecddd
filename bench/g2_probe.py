"""G2 probe: can the policy's language model bind a reference name to the query object
when it reads the frozen G1 vision tokens directly (no chat template)?

Feature bank: the frozen tower of CKPT encodes R reference renders and Q one-object
query scenes per triple. An episode: 2 references (one present in the query), each
followed by its name's three syllable tokens, then the query's 9 cell tokens, then the
answer name. Training uses training triples and training names, evaluation held-out
triples and evaluation names. Positions are 1-D.

    python bench/g2_probe.py --checkpoint checkpoints/tiny-vision --steps 2000 --reinit linear

Measured (1 thread, loaded 2-core machine): at the Hugging Face init (std 0.02) the
language model stays at chance (3 references, one-token names, 1000 steps: 0.33-0.46);
with every linear layer at PyTorch's default init (`--reinit linear`) it reaches 0.94
after 500 steps and 0.97 after 1000 on held-out triples; with syllable names and the
9-token query scene (2 references) 0.93 after 2000 steps. A normal init with std 0.05
(`--reinit std=0.05`) also learns it (0.96 after 750 steps).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from repic_ray.data.names import name_split, triple_split
from repic_ray.data.synthetic import draw_reference
from repic_ray.models.loading import load_policy, load_processor
from repic_ray.pipeline.pretrain_vision import draw_scene, encode_images


@torch.no_grad()
def feature_bank(model, processor, triples, renders: int, seed: int, query: str = "scene", cell_px: int = 28):
    """Per triple, `renders` reference tokens and `renders` one-object query scenes: all 9
    cell tokens (`query="scene"`) or the object's own cell token (`query="cell"`)."""
    rng = random.Random(seed)
    refs, queries = {}, {}
    for t in triples:
        imgs = [draw_reference(np.random.default_rng(rng.getrandbits(63)), *t, cell_px) for _ in range(renders)]
        scenes = [draw_scene(rng, [t], cell_px) for _ in range(renders)]
        feats = encode_images(model, processor, imgs + [s[0] for s in scenes])
        refs[t] = torch.stack([f[0] for f in feats[:renders]])
        if query == "cell":
            queries[t] = torch.stack([f[s[1].index(t)][None] for f, s in zip(feats[renders:], scenes)])
        else:
            queries[t] = torch.stack(feats[renders:])
    return refs, queries


N_REFS = 2
NAME_FIRST = False


def name_ids(tok, name: str) -> list[int]:
    if name.startswith("#"):
        return [int(name[1:])]
    return tok.encode(" " + name, add_special_tokens=False)


def episodes(rng, triples, names, refs, queries, tok, n):
    out = []
    for _ in range(n):
        ts = rng.sample(triples, N_REFS)
        ns = rng.sample(names, N_REFS)
        present = rng.randrange(N_REFS)
        r = [refs[t][rng.randrange(len(refs[t]))] for t in ts]
        q = queries[ts[present]][rng.randrange(len(queries[ts[present]]))]
        out.append((r, [name_ids(tok, x) for x in ns], q, present))
    return out


TEMPLATE: dict[str, list[int]] | None = None
TEMPLATE_SIDES = ("refs", "query")
TEMPLATE_ON = True  # off during a bare-layout warm-up (--template-from)


def set_template(tok) -> None:
    """Token ids of the chat-template text around images and names (as `repic_ray.prompts`)."""
    global TEMPLATE

    def enc(text):
        return tok.encode(text, add_special_tokens=False)
    TEMPLATE = {
        "head": enc("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"),
        "vs": enc("<|vision_start|>"), "ve": enc("<|vision_end|>"),
        "pre_name": enc("This is <"), "post_name": enc(">.\n"),
        "tail": enc("Who is in the image?<|im_end|>\n<|im_start|>assistant\n"),
    }


def embed(model, eps, answers: bool, swap: bool = False):
    emb = model.model.language_model.embed_tokens
    seqs, targets = [], []

    def t(key):
        return emb(torch.tensor(TEMPLATE[key]))
    templ = TEMPLATE if TEMPLATE_ON else None
    for r, ids, q, present in eps:
        order = list(range(len(r)))[::-1] if swap else list(range(len(r)))
        parts = []
        if templ:
            parts.append(t("head"))
        for i in order:
            if templ and "refs" in TEMPLATE_SIDES:
                parts += [t("vs"), r[i][None], t("ve"), t("pre_name"), emb(torch.tensor(ids[i])), t("post_name")]
            elif NAME_FIRST:
                parts += [emb(torch.tensor(ids[i])), r[i][None]]
            else:
                parts += [r[i][None], emb(torch.tensor(ids[i]))]
        parts += [t("vs"), q, t("ve"), t("tail")] if templ and "query" in TEMPLATE_SIDES else [q]
        ans = ids[present]
        if answers:
            parts.append(emb(torch.tensor(ans[:-1], dtype=torch.long)))
        seqs.append(torch.cat(parts))
        targets.append(ans)
    return torch.stack(seqs), torch.tensor(targets)


def forward(model, x):
    B, L, _ = x.shape
    pos = torch.arange(L)[None, None].expand(3, B, L)
    h = model.model.language_model(inputs_embeds=x, position_ids=pos).last_hidden_state
    return model.lm_head(h)


@torch.no_grad()
def evaluate(model, eps, swap=False):
    model.eval()
    x, y = embed(model, eps, answers=False, swap=swap)
    emb = model.model.language_model.embed_tokens
    out = []
    for _ in range(y.shape[1]):
        nxt = forward(model, x)[:, -1].argmax(-1)
        out.append(nxt)
        x = torch.cat([x, emb(nxt)[:, None]], 1)
    model.train()
    pred = torch.stack(out, 1)
    exact = (pred == y).all(1).float().mean().item()
    first = (pred[:, -1] == y[:, -1]).float().mean().item()
    return exact, first, pred


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", default="checkpoints/tiny-vision")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--renders", type=int, default=6)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    ap.add_argument("--query", choices=["scene", "cell"], default="scene")
    ap.add_argument("--single-names", action="store_true", help="names are one syllable token")
    ap.add_argument("--refs", type=int, default=2)
    ap.add_argument("--name-first", action="store_true")
    ap.add_argument("--template", nargs="?", const="both", choices=["both", "refs", "query"],
                    help="the chat template's text around images and names (both, or one side only)")
    ap.add_argument("--template-from", type=int, default=0,
                    help="with --template: train the bare layout until this step, the template after "
                         "(evaluation always in the template layout)")
    ap.add_argument("--seed", type=int, default=0, help="init and training-episode seed (evaluation episodes fixed)")
    ap.add_argument("--reinit", nargs="?", const="all", default=None,
                    help="re-initialise the language model: all (torch defaults), linear, embedding, std=X")
    ap.add_argument("--vision-norm", type=float, default=0.0, help="rescale each vision token to this norm")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model, processor = load_policy(args.checkpoint), load_processor(args.checkpoint)
    tok = processor.tokenizer
    model.model.visual.requires_grad_(False)
    if args.reinit:
        for mod in [model.model.language_model, model.lm_head]:
            for sub in mod.modules():
                is_emb = isinstance(sub, torch.nn.Embedding)
                if args.reinit == "linear" and is_emb or args.reinit == "embedding" and not is_emb:
                    continue
                if args.reinit.startswith("std="):
                    if getattr(sub, "weight", None) is not None and sub.weight.dim() > 1:
                        torch.nn.init.normal_(sub.weight, std=float(args.reinit[4:]))
                elif hasattr(sub, "reset_parameters"):
                    sub.reset_parameters()
    train_t, held_t = (list(x) for x in triple_split())
    train_n, eval_n = (list(x) for x in name_split())
    if args.single_names:
        from repic_ray.data.names import NAME_VOWEL_SYLLABLES
        train_n = eval_n = [f"#{tok.convert_tokens_to_ids(s)}" for s in NAME_VOWEL_SYLLABLES]
    global N_REFS, NAME_FIRST
    N_REFS, NAME_FIRST = args.refs, args.name_first
    if args.template:
        set_template(tok)
        global TEMPLATE_SIDES
        TEMPLATE_SIDES = ("refs", "query") if args.template == "both" else (args.template,)
    t0 = time.time()
    refs, queries = feature_bank(model, processor, train_t + held_t, args.renders, seed=1, query=args.query)
    print(f"bank {time.time() - t0:.1f}s", flush=True)
    if args.vision_norm:
        def rescale(bank):
            return {k: torch.nn.functional.normalize(v, dim=-1) * args.vision_norm for k, v in bank.items()}
        refs, queries = rescale(refs), rescale(queries)
    params = [p for n, p in model.named_parameters() if not n.startswith("model.visual")]
    opt = torch.optim.AdamW(params, lr=args.lr)
    rng = random.Random(args.seed)
    ev = episodes(random.Random(99), held_t, eval_n, refs, queries, tok, 400)
    log = []
    t0 = time.time()
    global TEMPLATE_ON
    for step in range(1, args.steps + 1):
        eps = episodes(rng, train_t, train_n, refs, queries, tok, args.batch)
        TEMPLATE_ON = step > args.template_from
        x, y = embed(model, eps, answers=True)
        logits = forward(model, x)[:, -y.shape[1]:]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % args.eval_every == 0 or step == args.steps:
            TEMPLATE_ON = True
            acc, first, _ = evaluate(model, ev)
            sacc, _, _ = evaluate(model, ev, swap=True)
            row = {"step": step, "loss": round(loss.item(), 4), "eval_exact": acc, "eval_syllable2": first,
                   "eval_exact_swapped": sacc, "elapsed_s": round(time.time() - t0, 1)}
            log.append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(log, indent=1))


if __name__ == "__main__":
    main()
