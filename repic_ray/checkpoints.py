"""Writing a trained policy as a plain Hugging Face checkpoint directory (SFT and RL)."""

from __future__ import annotations

from pathlib import Path

from repic_ray.models.loading import load_policy, load_processor


def save_hf_checkpoint(state_dict: dict, base: str, out: Path) -> Path:
    """Write merged policy weights (a learner's `export_full()`) as a plain HF checkpoint
    directory, with the processor and tokenizer of `base`."""
    out = Path(out)
    model = load_policy(base)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    if unexpected or [m for m in missing if "lora" not in m]:
        raise RuntimeError(f"export does not match the model: missing={missing[:5]} unexpected={unexpected[:5]}")
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    load_processor(base).save_pretrained(tmp)
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)
    return out
