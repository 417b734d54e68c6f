"""blip.allocator: a training step reuses freed memory instead of faulting in fresh pages every step."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO

# A tiny captioner with BERT's vocabulary at batch 4 (its gradients of the 30,524 x 96 embeddings are 12 MB).
PROGRAM = """
import resource, sys, torch
from blip.allocator import reuse_freed_memory
from blip.config.schema import TrainConfig
from blip.data.tokenizer import load_tokenizer
from blip.models.factory import build_model
from blip.training.optim import build_optimizer
from tests.conftest import TINY_BERT
if sys.argv[1] == "reuse":
    assert reuse_freed_memory()
torch.manual_seed(0)
tokenizer = load_tokenizer()
model = build_model("caption", TINY_BERT, tokenizer).train()
images = torch.randn(4, 3, TINY_BERT.image_size, TINY_BERT.image_size)
text = tokenizer(["a picture of a large red circle"] * 4, return_tensors="pt")
optimizer = build_optimizer(model, TrainConfig(lr=1e-5), torch.device("cpu"))
def step():
    model(images, text.input_ids, text.attention_mask).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
for _ in range(3):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def page_faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROGRAM, mode], capture_output=True, text=True, check=True, cwd=REPO)
    return int(out.stdout.strip())


def test_training_steps_reuse_freed_memory() -> None:
    default, reused = page_faults("default"), page_faults("reuse")
    assert default > 10 * 3000  # every step faults its 12 MB gradients in afresh (about 2,900 pages each)
    assert reused < default / 10, (reused, default)
