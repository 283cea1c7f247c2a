"""Goldens for kron's two-level KFAC from the reference code.

Runs one step of the two-level KFAC authors' optimizer (`TwolevelKFAC` of
Abdoulaye-Koroko/natural-gradients at commit 97105b6, `optimizers/twolevel_kfac.py`) on tiny
fixed nets for each coarse space, and prints the coarse vectors, the damped coarse matrix and the
corrected direction as JSON. kron's test `crates/kron-optim/tests/reference.rs` reads the committed output,
`twolevel_goldens.json`, and runs the same step with `EigenDamping::PerFactor` (the reference's
first-level damping).

Run by hand (nothing in the test suite runs Python):

    python3 -m venv /tmp/refenv
    /tmp/refenv/bin/pip install torch numpy          # CPU is enough; any torch 2.x
    git clone https://github.com/Abdoulaye-Koroko/natural-gradients /tmp/refsrc/ng
    git -C /tmp/refsrc/ng checkout 97105b6
    /tmp/refenv/bin/python tests/reference/twolevel_goldens.py /tmp/refsrc/ng \\
        > tests/reference/twolevel_goldens.json

The argument is the checkout (its `optimizers` package is imported). The settings:

* a dense net 3 -> 4 (tanh) -> 2 with biases, weights `0.5 sin(1 + k)` over the flattened
  parameters, a batch of 8 fixed inputs `sin(0.37 k^2 + 1)` and labels `n % 2`, softmax
  cross-entropy (the mean over the batch; its gradients are the empirical Fisher's); every
  coarse space, with and without Krylov enrichment where the reference allows it;
* a conv net (conv 2 -> 3, 3x3, padding 1, stride 2, relu, flatten, dense 27 -> 2) on 5 inputs
  of 2 x 5 x 6 for Nicolaides' space only: the reference's one-level KFC divides its
  conv factors and directions by the number of locations differently from kron (kron's
  convention is the KFC paper's), so only the coarse matrix, which depends on the captures
  alone, is comparable there;
* damping 0.1, statistics and inverses at this step (`T_cov = T_inv = 1`), no KL clipping.

Four quirks of the reference are patched here, so that the goldens hold the method as the
paper states it (kron's behaviour; the book's chapter lists them):

* the coarse right-hand side `<r_i, v_i>` and the residual read the gradient `flat_grads`,
  which `gather_list_grad` lays out as each layer's flattened weight followed by its bias, as if
  it were the `out x (in + 1)` matrix `[W | b]`: for every layer with a bias the gradient is
  scrambled (Nicolaides' and Tselepidis' all-ones vectors do not see it; the spectral and the
  residual spaces do); patched to lay `flat_grads` out as `[W | b]`;

* `Gv_CNN` (a conv layer's part of every Fisher product, the coarse entries among them)
  spreads the per-example scalars over the locations with `repeat`, which lays them out
  location-major while the captured columns are example-major (`b T + t`): each location meets
  another example's scalar (the conv net's coarse entry moves by 1.4%); patched to
  `repeat_interleave`;
* `multiply_by_inverse` (the residual and Krylov vectors) divides by the damped eigenvalues plus
  the damping again, `(L_g + λ)(L_x + λ)` with `L` already the eigenvalues of `A + λ I`; patched
  to the step's own preconditioner, `L_g L_x`;
* the spectral vector `torch.kron(Q_x[:,0], Q_g[:,0])` is viewed as `out x (in + 1)`, which
  scrambles the rank-one matrix; patched to `q_G q_A^T`.
"""

import json
import math
import sys


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    sys.path.insert(0, sys.argv[1])
    import torch
    import torch.nn as nn
    from optimizers.twolevel_kfac import TwolevelKFAC

    class Patched(TwolevelKFAC):
        def gather_list_grad(self):
            grads = []
            for group in self.param_groups:
                w, b = group["params"]
                g = w.grad.data.reshape(w.shape[0], -1)
                grads.append(torch.cat([g, b.grad.data.view(-1, 1)], dim=1).reshape(-1))
            return torch.cat(grads, 0)

        def Gv_CNN(self, state, v):
            T = state["num_locations"]
            w = v.view(-1).repeat_interleave(T).view(1, -1)
            return torch.mm(state["gy"] * w.expand_as(state["gy"]), state["x"].t())

        def multiply_by_inverse(self, state, vector):
            L_x, L_g, Q_x, Q_g = state["L_x"], state["L_g"], state["Q_x"], state["Q_g"]
            s = (state["ggt"].shape[1], state["xxt"].shape[0])
            v = torch.mm(torch.mm(Q_g.t(), vector.contiguous().view(*s)), Q_x)
            v = v / (L_g.unsqueeze(1) * L_x.unsqueeze(0))
            return torch.mm(torch.mm(Q_g, v), Q_x.t())

        def compute_coarse_space(self, group, residual):
            if self.coarse_space != "spectral":
                return super().compute_coarse_space(group, residual)
            state = self.state[group["params"][0]]
            r0 = torch.outer(state["Q_g"][:, 0], state["Q_x"][:, 0])
            state["r0"] = r0 / (torch.norm(r0, p=float("inf")) + 1e-8)

    torch.set_default_dtype(torch.float64)
    damping = 0.1

    def fill(net):
        k = 0
        with torch.no_grad():
            for p in net.parameters():
                flat = p.view(-1)
                for i in range(flat.numel()):
                    flat[i] = 0.5 * math.sin(1.0 + k)
                    k += 1

    def inp(k):
        # Not a harmonic of k: sin(c k) inputs would span two dimensions only, and the
        # factors' smallest eigenvectors (the spectral space) would be noise.
        return math.sin(0.37 * k * k + 1.0)

    def dense():
        net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
        fill(net)
        x = torch.tensor([[inp(n * 3 + j) for j in range(3)] for n in range(8)])
        return net, x

    def conv():
        net = nn.Sequential(
            nn.Conv2d(2, 3, 3, padding=1, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(27, 2)
        )
        fill(net)
        x = torch.tensor([inp(k) for k in range(5 * 2 * 5 * 6)]).view(5, 2, 5, 6)
        return net, x

    def one_step(make, space, krylov):
        net, x = make()
        y = torch.tensor([n % 2 for n in range(x.shape[0])])
        opt = Patched(
            net, damping=damping, T_cov=1, T_inv=1, coarse_space=space, krylov=krylov,
            batch_size=x.shape[0],
        )
        opt.update_stats = True
        net.zero_grad()
        loss = nn.functional.cross_entropy(net(x), y)
        loss.backward()
        opt.step()
        layers, vectors = [], []
        for group in opt.param_groups:
            w, b = group["params"]
            g = w.grad.reshape(w.shape[0], -1)
            layers.append(torch.cat([g, b.grad.view(-1, 1)], dim=1).tolist())
            state = opt.state[w]
            for key in ["r1", "r2"] if krylov else ["r0"]:
                vectors.append(state[key].reshape(w.shape[0], -1).tolist())
        return {
            "net": make.__name__,
            "space": space,
            "krylov": krylov,
            "coarse_matrix": opt.f_coarse.tolist(),
            "vectors": vectors,
            "direction": layers,
        }

    cases = []
    for space, krylov in [
        ("nicolaides", False),
        ("spectral", False),
        ("residual", False),
        ("tpselepedis", False),
        ("nicolaides", True),
        ("residual", True),
    ]:
        cases.append(one_step(dense, space, krylov))
    cases.append(one_step(conv, "nicolaides", False))
    json.dump(
        {
            "source": "Abdoulaye-Koroko/natural-gradients 97105b6, optimizers/twolevel_kfac.py",
            "torch": torch.__version__,
            "damping": damping,
            "cases": cases,
        },
        sys.stdout,
        indent=1,
    )
    print()


if __name__ == "__main__":
    main()
