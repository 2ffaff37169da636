"""A dynamically int8-quantized copy of an export, for CPU inference.

Every nn.Linear gets int8 weights (per output channel, symmetric) and computes with int8 matmuls
on dynamically quantized activations (torch's dynamic quantization); everything else stays fp32.
The copy is stored without pickles: `model_int8.safetensors` holds the fp32 tensors that are not
quantized plus, per linear layer, its int8 weight and its scales; `quantization.json` names the
layers. `load_int8` rebuilds it from the fp32 architecture. The weights deliberately do not sit in
`model.safetensors`: plain `from_pretrained` on the directory then raises (no weights file it
knows), instead of loading the config's architecture with random linear layers.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from dist_train import owned

QUANT_FILE = "quantization.json"
INT8_WEIGHTS = "model_int8.safetensors"
INT8_KIND = "int8 export"


def quantize_dynamic(model: torch.nn.Module) -> torch.nn.Module:
    """int8 dynamic quantization of every nn.Linear (a copy; `model` is unchanged)."""
    import copy

    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    with _quiet():
        return quantize_dynamic(copy.deepcopy(model).eval(), {torch.nn.Linear: per_channel_dynamic_qconfig},
                                dtype=torch.qint8)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """torch.ao's notes (once per quantized layer, on every load) tell a predict user nothing."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.ao")
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.ao")
        yield


def _quantized_linears(model: torch.nn.Module) -> dict[str, Any]:
    from torch.ao.nn.quantized.dynamic import Linear as QLinear

    return {name: m for name, m in model.named_modules() if isinstance(m, QLinear)}


def save_int8(qmodel: torch.nn.Module, export_dir: Path, out_dir: Path) -> Path:
    """Write the quantized copy of `export_dir` (config, tokenizer, task file) into `out_dir` (new, empty,
    or an earlier int8 copy: anything else raises OwnershipError)."""
    owned.check_output(out_dir, INT8_KIND, inputs=[export_dir], legacy=_earlier_int8, what="the int8 copy")
    tmp = owned.temp_beside(out_dir)
    try:
        _write_int8(qmodel, export_dir, tmp)
        owned.replace(tmp, out_dir, INT8_KIND, legacy=_earlier_int8, what="the int8 copy")
    finally:
        owned.discard(tmp)
    return out_dir


def _earlier_int8(path: Path) -> bool:
    """An int8 copy written before export markers existed: it has the quantization file."""
    return (path / QUANT_FILE).is_file()


def _write_int8(qmodel: torch.nn.Module, export_dir: Path, tmp: Path) -> None:
    from safetensors.torch import save_file

    shutil.copytree(export_dir, tmp, ignore=shutil.ignore_patterns("*.safetensors", "*.bin", owned.OWNER),
                    dirs_exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    linears = _quantized_linears(qmodel)
    for name, m in linears.items():
        w, b = m.weight(), m.bias()
        tensors[f"{name}.weight_int8"] = w.int_repr().contiguous()
        tensors[f"{name}.weight_scales"] = w.q_per_channel_scales().float().contiguous()
        if b is not None:
            tensors[f"{name}.bias"] = b.detach().contiguous()
    for key, value in qmodel.state_dict().items():  # the rest (embeddings, norms) stays fp32
        packed = any(key.startswith(f"{name}.") for name in linears)  # packed params, stored above
        if not packed and isinstance(value, torch.Tensor):
            tensors[key] = value.detach().contiguous()
    save_file({k: v.clone() for k, v in tensors.items()}, str(tmp / INT8_WEIGHTS))  # clone: no shared storage
    card = tmp / "README.md"
    note = (f"# int8 copy of {export_dir}\n\nDynamic int8 quantization of every linear layer, for CPU inference. "
            "Plain transformers cannot load it (`from_pretrained` raises: there is no model.safetensors); load "
            "it with `dist-train predict THIS_DIR --input FILE.jsonl`, or in Python with "
            "`dist_train.tasks.quantize.load_int8(Path(THIS_DIR), AUTO_CLASS_NAME)`.\n\n"
            "The card of the model it was made from follows.\n\n")
    card.write_text(note + (card.read_text().split("---\n", 2)[-1] if card.is_file() else ""))
    (tmp / QUANT_FILE).write_text(json.dumps({"scheme": "dynamic int8, per-channel symmetric weights",
                                              "linears": sorted(linears)}, indent=1))


def load_int8(int8_dir: Path, auto_class: str) -> torch.nn.Module:
    """The quantized model written by save_int8 (safetensors only)."""
    import transformers
    from safetensors.torch import load_file

    config = transformers.AutoConfig.from_pretrained(str(int8_dir))
    model = getattr(transformers, auto_class).from_config(config)  # computed buffers (rotary) need real init
    weights = int8_dir / INT8_WEIGHTS
    tensors = load_file(str(weights if weights.is_file() else int8_dir / "model.safetensors"))  # older copies
    model.load_state_dict({k: v for k, v in tensors.items() if not k.endswith(("_int8", "_scales"))}, strict=False)
    model.tie_weights()
    qmodel = quantize_dynamic(model)  # the linear layers' weights are replaced below
    with _quiet():
        for name, m in _quantized_linears(qmodel).items():
            scales = tensors[f"{name}.weight_scales"].double()
            q = torch._make_per_channel_quantized_tensor(tensors[f"{name}.weight_int8"], scales,
                                                         torch.zeros_like(scales, dtype=torch.long), 0)
            m.set_weight_bias(q, tensors.get(f"{name}.bias"))
    return qmodel.eval()
