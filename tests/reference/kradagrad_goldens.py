"""Goldens for kron's Shampoo, KrADagrad* and KrADagrad from the reference code.

Runs three steps of the KrADagrad authors' optimizers (jonathanmei/kradagrad at commit
9852c42: `KradagradPP` is the paper's KrADagrad*, `KradagradMM` its KrADagrad, and the copy of
Google's reference PyTorch Shampoo they extend) on a fixed 12 x 16 parameter and fixed
gradients, and prints the parameters after each step as JSON. kron's test
`crates/kron-optim/tests/reference.rs` reads the committed output, `goldens.json`, and runs the
same steps.

Run by hand (nothing in the test suite runs Python):

    python3 -m venv /tmp/refenv
    /tmp/refenv/bin/pip install torch numpy          # CPU is enough; any torch 2.x
    git clone https://github.com/jonathanmei/kradagrad /tmp/refsrc/kradagrad
    git -C /tmp/refsrc/kradagrad checkout 9852c42
    /tmp/refenv/bin/python tests/reference/kradagrad_goldens.py /tmp/refsrc \\
        > tests/reference/goldens.json

The argument is the directory that holds the `kradagrad` checkout (it is imported as a
package). Settings, the same for the three methods, chosen so that the reference's paths are
the documented ones:

* the parameter is 12 x 16 and `block_size` 100: the reference merges small axes while their
  product stays within the block size, and 12 * 16 > 100 keeps the matrix a matrix;
* `matrix_eps` 0.1, `beta2` 1, statistics and roots every step, preconditioning from the first
  step (`start_preconditioning_step` 1 for the `Shampoo.step` path, which counts steps from 1,
  and 0 for `KradagradMM.step`, which counts from 0);
* heavy-ball momentum 0.9 with `nesterov=False`: the reference's Nesterov branch multiplies its
  momentum buffer in place (`momentum_update = state[MOMENTUM]; momentum_update.mul_(...)`), so
  its buffer is not the heavy-ball velocity; kron's Nesterov is PyTorch SGD's;
* `graft_type` SGD for Shampoo and KrADagrad* (`Shampoo.step` rescales the direction to the
  gradient's norm); KrADagrad has no grafting;
* `KradagradPP(cpu=True)`: the serial path, whose denominator is `(1 + tr(C P)) * d`
  (kron: `Denominator::TraceTimesSize`).

At 9852c42 `kradagrad.py` imports `batched_matrix_functions`, which the commit does not contain;
only the batched GPU path uses it, so an empty module stands in for it.
"""

import json
import math
import sys
import types


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    sys.path.insert(0, sys.argv[1])
    sys.modules["kradagrad.batched_matrix_functions"] = types.ModuleType(
        "kradagrad.batched_matrix_functions"
    )
    import torch
    import kradagrad
    from kradagrad.third_party.shampoo.shampoo import LayerwiseGrafting

    torch.set_default_dtype(torch.float32)
    rows, cols, steps = 12, 16, 3
    w0 = [[0.5 * math.sin(1.0 + i * cols + j) for j in range(cols)] for i in range(rows)]
    grads = [
        [
            [math.cos(0.37 * (i * cols + j) + 1.3 * k) + 0.1 * (i - j) / cols for j in range(cols)]
            for i in range(rows)
        ]
        for k in range(steps)
    ]

    def hps(start):
        return kradagrad.HyperParams(
            block_size=100,
            matrix_eps=0.1,
            beta2=1.0,
            nesterov=False,
            graft_type=LayerwiseGrafting.SGD,
            start_preconditioning_step=start,
            preconditioning_compute_steps=1,
            statistics_compute_steps=1,
        )

    makers = {
        "shampoo": lambda p: kradagrad.Shampoo([p], lr=0.1, momentum=0.9, hyperparams=hps(1)),
        "kradagrad_star": lambda p: kradagrad.KradagradPP(
            [p], lr=0.1, momentum=0.9, hyperparams=hps(1), cpu=True
        ),
        "kradagrad": lambda p: kradagrad.KradagradMM(
            [p], lr=0.1, momentum=0.9, hyperparams=hps(0)
        ),
    }
    runs = {}
    for name, make in makers.items():
        p = torch.tensor(w0, dtype=torch.float32, requires_grad=True)
        opt = make(p)
        after = []
        for k in range(steps):
            p.grad = torch.tensor(grads[k], dtype=torch.float32)
            opt.step()
            after.append(p.detach().clone().reshape(-1).tolist())
        runs[name] = after
    out = {
        "source": "jonathanmei/kradagrad 9852c42, torch " + torch.__version__,
        "shape": [rows, cols],
        "lr": 0.1,
        "momentum": 0.9,
        "matrix_eps": 0.1,
        "w0": [x for row in w0 for x in row],
        "grads": [[x for row in g for x in row] for g in grads],
        "runs": runs,
    }
    json.dump(out, sys.stdout, indent=1)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
