"""The batched engine's calls captured as CUDA graphs and replayed.

On a GPU a training step of the batched engine is about a thousand small kernels, each too short
to hide the CPU's cost of launching it, so the GPU mostly waits. A CUDA graph records the kernels
of one call once; a replay launches all of them at once. What a replay needs:
- fixed shapes: one graph per batch shape (users, rows, support size, dtypes);
- fixed addresses: the batch's tensors are copied into buffers the graph reads, and the model's
  parameters and memories must keep their storage (the optimiser's steps, the memory writes and
  load_state_dict change them in place; a changed address is refused, not silently read stale);
- no work on the CPU inside the call (the engine never reads a GPU value back).
A replay recomputes the same kernels on the same inputs, so its results equal the eager call's.
"""
import dataclasses
import time

import torch


class CapturedCall:
    """One engine method at one batch shape, behind input buffers.

    method(batch, profiles, item_profiles, attention) -> results; `inputs` (ratings, profiles,
    item_profiles, attention or None) give the shapes; `model`: its parameters and buffers, which
    the call reads, must keep their addresses. With capture=False the call runs eagerly on the buffers (no GPU
    needed): the CPU tests take that path.
    """

    def __init__(self, method, batch, inputs, model, capture):
        self.method, self.batch, self.model = method, batch, model
        self.addresses = self.model_addresses()
        self.buffers = [None if t is None else t.clone() for t in inputs]
        self.graph = self.results = None
        if capture:
            warmup = torch.cuda.Stream()  # the first run sets up cuBLAS's handles and workspaces
            warmup.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(warmup):
                self.run()
            torch.cuda.current_stream().wait_stream(warmup)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.results = self.run()

    def model_addresses(self):
        return [t.data_ptr() for t in (*self.model.parameters(), *self.model.buffers())]

    def run(self):
        ratings, profiles, item_profiles, attention = self.buffers
        return self.method(dataclasses.replace(self.batch, ratings=ratings), profiles, item_profiles, attention)

    def __call__(self, inputs):
        """Results for `inputs`; with a graph they live in the graph's memory until the next replay."""
        if self.model_addresses() != self.addresses:
            raise RuntimeError("a parameter or memory tensor of the model moved since the CUDA graph was captured; "
                               "change them in place (copy_) or build a new engine")
        for buffer, tensor in zip(self.buffers, inputs):
            if buffer is not None:
                buffer.copy_(tensor)
        if self.graph is None:
            return self.run()
        self.graph.replay()
        return self.results


class GraphedEngine:
    """A BatchedEngine whose calls replay CUDA graphs, one per batch shape.

    A shape is captured the second time it is seen; its first call runs eagerly, so a shape seen
    once (the shorter last batch of an epoch, a single inference) costs no capture. `capture`:
    False runs the same buffered path without graphs (for CPU tests). The meta-gradients are valid
    until the next call; predictions are copied out.
    """

    def __init__(self, engine, capture=True):
        self.engine, self.capture = engine, capture
        self.model = engine.model
        self.seen, self.calls = set(), {}
        self.capture_seconds = 0.0  # wall time spent capturing (warm-up run included)

    def meta_gradients(self, batch, profiles, item_profiles, attention):
        """As BatchedEngine.meta_gradients."""
        return self.call(self.engine.meta_gradients, batch, profiles, item_profiles, attention)

    def predict(self, batch, profiles, item_profiles, attention):
        """As BatchedEngine.predict."""
        return self.call(self.engine.predict, batch, profiles, item_profiles, attention).clone()

    def call(self, method, batch, profiles, item_profiles, attention):
        inputs = (batch.ratings, profiles, item_profiles, attention)
        key = (method.__name__, batch.support_size, *[None if t is None else (t.shape, t.dtype) for t in inputs])
        with torch.no_grad():
            if key not in self.calls:
                if key not in self.seen:
                    self.seen.add(key)
                    return method(batch, profiles, item_profiles, attention)
                started = time.perf_counter()
                self.calls[key] = CapturedCall(method, batch, inputs, self.model, self.capture)
                if self.capture:
                    torch.cuda.synchronize()
                self.capture_seconds += time.perf_counter() - started
            return self.calls[key](inputs)
