"""Parity probes: variants of the recipe on chosen seeds (not part of the package)."""
import sys, json, torch
torch.set_num_threads(1)
from openxlstm.experiments import runner, models
from openxlstm.layers.slstm import forget_bias_init

variant, model, seeds = sys.argv[1], sys.argv[2], [int(s) for s in sys.argv[3].split(",")]
kw = dict(steps=2000, batch_size=32, lr=1e-2, schedule="constant")
orig = models.build_model

def build(name, vocab, width=64, num_blocks=2, num_heads=4, context_length=256):
    m = orig(name, vocab, width, num_blocks, num_heads, context_length)
    if variant.startswith("bias0") and hasattr(m, "blocks"):
        for b in m.blocks:
            if b.kind == "s":
                L = b.layer; E = L.config.embedding_dim
                with torch.no_grad():
                    L.bias[E:2*E] = forget_bias_init(L.config, L.head_dim, 0).repeat(L.num_heads)
    return m

runner.build_model = build
if "wd0" in variant:
    kw["weight_decay"] = 0.0
for s in seeds:
    spec = runner.CellSpec(task="parity", model=model, seed=s, **kw)
    row = runner.run_cell(spec, log_every=500)
    print(json.dumps({"variant": variant, "model": model, "seed": s, "scaled": row["scaled_accuracy"],
                      "train_acc": row["train_accuracy"], "loss": row["final_loss"], "s": row["seconds"]}), flush=True)
