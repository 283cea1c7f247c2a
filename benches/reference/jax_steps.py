"""The two steps of step_table in JAX, jit-compiled, timed the same way (median and best of
repeated forward+backward passes), for comparison on the same machine.

    python -m venv /tmp/jaxenv && /tmp/jaxenv/bin/pip install "jax[cpu]"
    /tmp/jaxenv/bin/python benches/reference/jax_steps.py [--reps 15]

(a) the deep autoencoder 784-1000-500-250-30-250-500-1000-784, sigmoid hidden units, a linear
30-unit code, sigmoid binary cross-entropy on the output logits, batch 1000; (b) the conv net:
three times [conv 5x5 padding 2, ReLU, max-pool 3x3 stride 2 padding 1] with 32, 32, 64
channels, then dense 1024 -> 10 with softmax cross-entropy, batch 128. NCHW, f32.
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
from jax import lax


def dense_init(key, sizes):
    params = []
    for d_in, d_out in zip(sizes[:-1], sizes[1:]):
        key, k = jax.random.split(key)
        w = jax.random.normal(k, (d_out, d_in), jnp.float32) * jnp.sqrt(2.0 / (d_in + d_out))
        params.append((w, jnp.zeros((d_out,), jnp.float32)))
    return params


def autoencoder_loss(params, x):
    h = x
    for i, (w, b) in enumerate(params):
        s = h @ w.T + b
        last, code = i == len(params) - 1, i == 3
        h = s if (last or code) else jax.nn.sigmoid(s)
    # Sigmoid binary cross-entropy on the logits, summed over outputs, mean over the batch.
    bce = jnp.maximum(h, 0) - h * x + jnp.log1p(jnp.exp(-jnp.abs(h)))
    return bce.sum() / x.shape[0]


def conv_init(key):
    params = []
    for c_in, c_out in [(3, 32), (32, 32), (32, 64)]:
        key, k = jax.random.split(key)
        w = jax.random.normal(k, (c_out, c_in, 5, 5), jnp.float32) * jnp.sqrt(2.0 / (c_in * 25))
        params.append((w, jnp.zeros((c_out,), jnp.float32)))
    key, k = jax.random.split(key)
    params.append((jax.random.normal(k, (10, 1024), jnp.float32) * 0.03, jnp.zeros((10,))))
    return params


def convnet_loss(params, x, labels):
    """NCHW, as kron lays the batch out."""
    h = x
    for w, b in params[:3]:
        h = lax.conv_general_dilated(h, w, (1, 1), [(2, 2), (2, 2)],
                                     dimension_numbers=("NCHW", "OIHW", "NCHW"))
        h = jax.nn.relu(h + b[None, :, None, None])
        h = lax.reduce_window(h, -jnp.inf, lax.max, (1, 1, 3, 3), (1, 1, 2, 2),
                              [(0, 0), (0, 0), (1, 1), (1, 1)])
    return head_loss(params, h, labels)


def convnet_nhwc_loss(params, x, labels):
    """NHWC, the layout XLA's CPU convolutions prefer (the same net, the weights transposed)."""
    h = x
    for w, b in params[:3]:
        h = lax.conv_general_dilated(h, w, (1, 1), [(2, 2), (2, 2)],
                                     dimension_numbers=("NHWC", "OIHW", "NHWC"))
        h = jax.nn.relu(h + b)
        h = lax.reduce_window(h, -jnp.inf, lax.max, (1, 3, 3, 1), (1, 2, 2, 1),
                              [(0, 0), (1, 1), (1, 1), (0, 0)])
    return head_loss(params, h, labels)


def head_loss(params, h, labels):
    w, b = params[3]
    logits = h.reshape(h.shape[0], -1) @ w.T + b
    logp = jax.nn.log_softmax(logits)
    return -jnp.take_along_axis(logp, labels[:, None], axis=1).mean()


def timed(f, args, reps):
    jax.block_until_ready(f(*args))  # compile
    jax.block_until_ready(f(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=15)
    reps = parser.parse_args().reps
    print(f"JAX {jax.__version__} on {jax.devices()}")
    key = jax.random.PRNGKey(0)

    sizes = [784, 1000, 500, 250, 30, 250, 500, 1000, 784]
    params = dense_init(key, sizes)
    x = jax.random.uniform(key, (1000, 784), jnp.float32)
    step = jax.jit(jax.value_and_grad(autoencoder_loss))
    # Forward, input gradient and weight gradient of every layer, less the first layer's
    # input gradient (the data needs none): the count step_table prints.
    flops = 6 * 1000 * sum(a * b for a, b in zip(sizes[:-1], sizes[1:])) - 2 * 1000 * 784 * 1000
    med, best = timed(step, (params, x), reps)
    print(f"autoencoder  batch 1000  median {med * 1e3:7.1f} ms  best {best * 1e3:7.1f} ms"
          f"  {flops / 1e9 / med:5.1f} GFLOP/s median")

    params = conv_init(key)
    x = jax.random.normal(key, (128, 3, 32, 32), jnp.float32)
    labels = jax.random.randint(key, (128,), 0, 10)
    step = jax.jit(jax.value_and_grad(convnet_loss))
    med, best = timed(step, (params, x, labels), reps)
    print(f"convnet      batch 128   median {med * 1e3:7.1f} ms  best {best * 1e3:7.1f} ms  (NCHW)")
    step = jax.jit(jax.value_and_grad(convnet_nhwc_loss))
    med, best = timed(step, (params, x.transpose(0, 2, 3, 1), labels), reps)
    print(f"convnet      batch 128   median {med * 1e3:7.1f} ms  best {best * 1e3:7.1f} ms  (NHWC)")


if __name__ == "__main__":
    main()
