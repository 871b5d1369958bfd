"""Train the bundled Fashion-MNIST example network and write it out as ONNX.

This script rebuilds the three artefacts that ``make demo`` runs on:

* ``fashion_cnn.onnx`` - a small MobileNetV2-style CNN (opset 13, BatchNorm kept as
  separate ``BatchNormalization`` nodes, ReLU6 as ``Clip``), float32.
* ``calib.npz`` - 256 training images (fixed seed) for post-training calibration.
* ``test.npz`` - the first 1000 images of the official test split.

Images are scaled to [0, 1] and nothing else: the quantiser sees exactly the input
range the microcontroller will see, with no mean/std folding to get wrong.

The ONNX graph is assembled by hand with ``onnx.helper`` rather than
``torch.onnx.export`` so that the file does not depend on the exporter version
installed (the TorchScript and dynamo exporters name nodes, fold BatchNorm and
pick IR versions differently). The layout imitates a PyTorch eval-mode export with
BatchNorm preserved; node names are the module path, e.g. ``/features/0/0/Conv``.

Usage (needs torch, onnx, onnxruntime and numpy; CPU only)::

    python examples/fashion/train.py
"""

from __future__ import annotations

import argparse
import gzip
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

HERE = Path(__file__).resolve().parent
DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
SEED = 20240601
NUM_CLASSES = 10
IMAGE_SIZE = 28
OPSET = 13
# IR 8 is what PyTorch 2.x writes for opset 13 and loads in every onnxruntime mpq supports;
# onnx.helper would otherwise stamp the newest IR version, which older runtimes reject.
IR_VERSION = 8

CALIB_COUNT = 256
TEST_COUNT = 1000
MAX_MODEL_BYTES = 300 * 1024
MAX_NPZ_BYTES = 2 * 1024 * 1024

# Inverted-residual settings: (expansion factor, output channels, stride).
# Two stride-2 blocks take 28x28 down to 7x7; the stride-1 blocks get a residual Add.
# The first block expands only 2x because its expanded tensor is still 28x28: at 4x it is
# by far the largest activation (training time on CPU, peak RAM on the microcontroller).
BLOCKS: tuple[tuple[int, int, int], ...] = (
    (2, 24, 2),
    (4, 24, 1),
    (4, 40, 2),
    (4, 40, 1),
)
STEM_CHANNELS = 16
HEAD_CHANNELS = 96


# --------------------------------------------------------------------------- data


def read_idx_images(path: Path) -> np.ndarray:
    """Read a gzipped IDX3 image file into a uint8 array of shape [N, 28, 28]."""
    with gzip.open(path, "rb") as f:
        magic, count, rows, cols = struct.unpack(">IIII", f.read(16))
        if magic != 2051:
            raise ValueError(f"{path}: bad IDX3 magic {magic}")
        data = np.frombuffer(f.read(), dtype=np.uint8)
    return data.reshape(count, rows, cols)


def read_idx_labels(path: Path) -> np.ndarray:
    """Read a gzipped IDX1 label file into a uint8 array of shape [N]."""
    with gzip.open(path, "rb") as f:
        magic, count = struct.unpack(">II", f.read(8))
        if magic != 2049:
            raise ValueError(f"{path}: bad IDX1 magic {magic}")
        data = np.frombuffer(f.read(), dtype=np.uint8)
    if data.shape[0] != count:
        raise ValueError(f"{path}: header says {count} labels, found {data.shape[0]}")
    return data


def load_split(data_dir: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Return (images float32 [N,1,28,28] in [0,1], labels uint8 [N]) for 'train' or 't10k'."""
    images = read_idx_images(data_dir / f"{split}-images-idx3-ubyte.gz")
    labels = read_idx_labels(data_dir / f"{split}-labels-idx1-ubyte.gz")
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{split}: {images.shape[0]} images but {labels.shape[0]} labels")
    x = (images.astype(np.float32) / np.float32(255.0))[:, None, :, :]
    return x, labels.copy()  # frombuffer is read-only; torch.from_numpy warns on that


# -------------------------------------------------------------------------- model


class ConvBNReLU6(nn.Sequential):
    """Conv (no bias, BN follows) + BatchNorm + ReLU6, as in torchvision's MobileNetV2."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1):
        super().__init__(
            nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU6(inplace=True),
        )


class InvertedResidual(nn.Module):
    """1x1 expand -> 3x3 depthwise -> 1x1 linear project, with a skip when shapes match."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        self.use_residual = stride == 1 and cin == cout
        self.conv = nn.Sequential(
            ConvBNReLU6(cin, hidden, 1),
            ConvBNReLU6(hidden, hidden, 3, stride, groups=hidden),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_residual else out


class FashionCNN(nn.Module):
    """MobileNetV2-style classifier for 28x28 greyscale images."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = [ConvBNReLU6(1, STEM_CHANNELS, 3)]
        cin = STEM_CHANNELS
        for expand, cout, stride in BLOCKS:
            layers.append(InvertedResidual(cin, cout, stride, expand))
            cin = cout
        layers.append(ConvBNReLU6(cin, HEAD_CHANNELS, 1))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(HEAD_CHANNELS, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def count_params(model: nn.Module) -> int:
    """Trainable parameters (BN running stats are buffers and not counted)."""
    return sum(p.numel() for p in model.parameters())


def layer_table(model: FashionCNN) -> list[tuple[str, tuple[int, ...], int]]:
    """(layer name, output shape for one image, parameter count) per top-level layer."""
    named: list[tuple[str, nn.Module]] = [
        (f"features.{i}", m) for i, m in enumerate(model.features)
    ]
    named += [("pool", model.pool), ("classifier", model.classifier)]
    rows: list[tuple[str, tuple[int, ...], int]] = []
    x = torch.zeros(1, 1, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        for name, module in named:
            if name == "classifier":
                x = torch.flatten(x, 1)
            x = module(x)
            rows.append((name, tuple(x.shape[1:]), count_params(module)))
    return rows


# ----------------------------------------------------------------------- training


@dataclass
class TrainConfig:
    """Hyper-parameters of the one-cycle AdamW run."""

    # Five epochs: about 10 minutes on an idle 2-core CPU; a sixth added < 0.1 points.
    epochs: int = 5
    # 256 with channels_last was the fastest setting measured on a 2-core CPU.
    batch_size: int = 256
    lr: float = 4e-3
    weight_decay: float = 1e-4
    label_smoothing: float = 0.05


def random_hflip(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Flip each image left/right with probability 1/2.

    A mirrored garment or shoe is still the same class, so this is label-preserving; a short
    schedule on a 35k-parameter net underfits rather than overfits, so nothing stronger.
    """
    flip = torch.rand(x.shape[0], generator=gen) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with no weight decay on BN/bias vectors (decaying them only fights BN)."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr)


def train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: TrainConfig,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
) -> None:
    """One-cycle AdamW training; prints loss and test accuracy after every epoch."""
    gen = torch.Generator().manual_seed(SEED)
    # NHWC measured clearly faster than NCHW for this net on CPU (oneDNN depthwise convs).
    model.to(memory_format=torch.channels_last)
    opt = make_optimizer(model, cfg)
    steps_per_epoch = (x.shape[0] + cfg.batch_size - 1) // cfg.batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=cfg.lr, epochs=cfg.epochs, steps_per_epoch=steps_per_epoch
    )
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    for epoch in range(cfg.epochs):
        model.train()
        start = time.perf_counter()
        order = torch.randperm(x.shape[0], generator=gen)
        total = 0.0
        for i in range(steps_per_epoch):
            idx = order[i * cfg.batch_size : (i + 1) * cfg.batch_size]
            xb = random_hflip(x[idx], gen).contiguous(memory_format=torch.channels_last)
            loss = loss_fn(model(xb), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * idx.shape[0]
        acc = torch_accuracy(model, x_test, y_test)
        print(
            f"epoch {epoch + 1:2d}/{cfg.epochs}  loss {total / x.shape[0]:.4f}  "
            f"test acc {acc:.4f}  ({time.perf_counter() - start:.1f} s)",
            flush=True,
        )


@torch.no_grad()
def torch_predict(model: nn.Module, x: torch.Tensor, batch: int = 1000) -> torch.Tensor:
    """Eval-mode logits for a whole array, in chunks to bound memory."""
    model.eval()
    return torch.cat([model(x[i : i + batch]) for i in range(0, x.shape[0], batch)])


def torch_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy of the torch model."""
    return (torch_predict(model, x).argmax(1) == y).float().mean().item()


# --------------------------------------------------------------------------- ONNX


@dataclass
class GraphBuilder:
    """Accumulates nodes (in execution order) and initializers for one ONNX graph."""

    nodes: list[onnx.NodeProto] = field(default_factory=list)
    initializers: list[onnx.TensorProto] = field(default_factory=list)
    names: dict[nn.Module, str] = field(default_factory=dict)

    def scope(self, module: nn.Module) -> str:
        """'/features/2/conv/0/0' for module 'features.2.conv.0.0' (root module -> '')."""
        qual = self.names[module]
        return "/" + qual.replace(".", "/") if qual else ""

    def add_init(self, name: str, value: np.ndarray) -> str:
        """Store a float32 initializer and return its name for use as a node input."""
        self.initializers.append(numpy_helper.from_array(value.astype(np.float32), name))
        return name

    def add_param(self, module: nn.Module, attr: str) -> str:
        """Register a module tensor under its state_dict key, as torch export does."""
        # .contiguous(): training left conv weights channels_last; ONNX wants plain OIHW.
        tensor = getattr(module, attr).detach().cpu().contiguous().numpy()
        return self.add_init(f"{self.names[module]}.{attr}", tensor)

    def add_node(self, op: str, scope: str, inputs: list[str], **attrs: object) -> str:
        """Append one node named like torch's exporter does and return its output name."""
        name = f"{scope}/{op}"
        out = f"{name}_output_0"
        self.nodes.append(helper.make_node(op, inputs, [out], name=name, **attrs))
        return out


def emit_conv(g: GraphBuilder, conv: nn.Conv2d, x: str) -> str:
    """Conv with OIHW weight; bias input only if the torch layer has one."""
    inputs = [x, g.add_param(conv, "weight")]
    if conv.bias is not None:
        inputs.append(g.add_param(conv, "bias"))
    if isinstance(conv.padding, str):
        raise TypeError(f"{g.scope(conv)}: string padding {conv.padding!r} is not lowered")
    ph, pw = conv.padding
    return g.add_node(
        "Conv",
        g.scope(conv),
        inputs,
        dilations=list(conv.dilation),
        group=conv.groups,
        kernel_shape=list(conv.kernel_size),
        pads=[ph, pw, ph, pw],
        strides=list(conv.stride),
    )


def emit_bn(g: GraphBuilder, bn: nn.BatchNorm2d, x: str) -> str:
    """Inference-mode BatchNormalization (scale, B, mean, var) kept separate from the Conv."""
    inputs = [x] + [g.add_param(bn, a) for a in ("weight", "bias", "running_mean", "running_var")]
    # ONNX momentum is the weight of the *old* running value, torch's is of the new one.
    return g.add_node(
        "BatchNormalization",
        g.scope(bn),
        inputs,
        epsilon=bn.eps,
        momentum=1.0 - (bn.momentum or 0.1),
    )


def emit_module(g: GraphBuilder, module: nn.Module, x: str) -> str:
    """Emit the ONNX nodes for one module of FashionCNN and return its output tensor."""
    if isinstance(module, nn.Conv2d):
        return emit_conv(g, module, x)
    if isinstance(module, nn.BatchNorm2d):
        return emit_bn(g, module, x)
    if isinstance(module, nn.ReLU6):
        return g.add_node("Clip", g.scope(module), [x, "clip_min", "clip_max"])
    if isinstance(module, InvertedResidual):
        out = emit_module(g, module.conv, x)
        return g.add_node("Add", g.scope(module), [x, out]) if module.use_residual else out
    if isinstance(module, nn.Sequential):
        for child in module:
            x = emit_module(g, child, x)
        return x
    if isinstance(module, nn.AdaptiveAvgPool2d):
        return g.add_node("GlobalAveragePool", g.scope(module), [x])
    if isinstance(module, nn.Linear):
        inputs = [x, g.add_param(module, "weight"), g.add_param(module, "bias")]
        return g.add_node("Gemm", g.scope(module), inputs, alpha=1.0, beta=1.0, transB=1)
    raise TypeError(f"no ONNX lowering for {type(module).__name__}")


def build_onnx(model: FashionCNN) -> onnx.ModelProto:
    """Lower the trained (eval-mode) model to an opset-13 ONNX graph."""
    model.eval()
    g = GraphBuilder(names={m: n for n, m in model.named_modules()})
    # One shared pair of scalar bounds serves every ReLU6 -> Clip.
    g.add_init("clip_min", np.array(0.0, dtype=np.float32))
    g.add_init("clip_max", np.array(6.0, dtype=np.float32))
    x = emit_module(g, model.features, "input")
    x = emit_module(g, model.pool, x)
    x = g.add_node("Flatten", "", [x], axis=1)  # torch.flatten in forward() has no module
    x = emit_module(g, model.classifier, x)
    g.nodes[-1].output[0] = "logits"

    graph = helper.make_graph(
        g.nodes,
        "fashion_cnn",
        inputs=[
            helper.make_tensor_value_info(
                "input", TensorProto.FLOAT, ["batch", 1, IMAGE_SIZE, IMAGE_SIZE]
            )
        ],
        outputs=[
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", NUM_CLASSES])
        ],
        initializer=g.initializers,
    )
    onnx_model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="mpq examples/fashion/train.py",
        producer_version=torch.__version__,
        doc_string="Fashion-MNIST MobileNetV2-style CNN; input float32 [0,1], NCHW.",
    )
    onnx_model.ir_version = IR_VERSION
    onnx.checker.check_model(onnx_model, full_check=True)
    return onnx_model


def ort_predict(session: ort.InferenceSession, x: np.ndarray, batch: int = 1000) -> np.ndarray:
    """onnxruntime logits for a whole array, in chunks (the batch dimension is symbolic)."""
    return np.concatenate(
        [session.run(["logits"], {"input": x[i : i + batch]})[0] for i in range(0, len(x), batch)]
    )


def open_session(path: Path) -> ort.InferenceSession:
    """onnxruntime session on the file as written (checked again after the round trip)."""
    onnx.checker.check_model(str(path), full_check=True)
    opts = ort.SessionOptions()
    # Graph optimisations would fuse BN into Conv; evaluate the graph exactly as shipped.
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def check_against_torch(session: ort.InferenceSession, model: nn.Module, x: np.ndarray) -> None:
    """Fail unless onnxruntime reproduces the torch logits to within 1e-4."""
    ref = torch_predict(model, torch.from_numpy(x)).numpy()
    diff = float(np.abs(ort_predict(session, x) - ref).max())
    print(f"onnxruntime vs torch on {len(x)} test images: max abs diff {diff:.2e}")
    if diff >= 1e-4:
        raise RuntimeError(f"ONNX output differs from torch by {diff:.2e}")


def ort_accuracy(session: ort.InferenceSession, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy of the ONNX model."""
    return float((ort_predict(session, x).argmax(1) == y).mean())


# -------------------------------------------------------------------------- files


def write_npz(path: Path, x: np.ndarray, y: np.ndarray) -> None:
    """Save x as float32 NCHW in [0, 1] and y as uint8 class labels, zip-compressed."""
    np.savez_compressed(path, x=x.astype(np.float32), y=y.astype(np.uint8))


def write_datasets(
    out_dir: Path, x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray
) -> None:
    """calib.npz: a seeded random draw from the training split (never from test data);
    test.npz: the first images of the test split, so anyone can reproduce the subset."""
    rng = np.random.default_rng(SEED)
    calib_idx = np.sort(rng.choice(len(x_train), CALIB_COUNT, replace=False))
    write_npz(out_dir / "calib.npz", x_train[calib_idx], y_train[calib_idx])
    write_npz(out_dir / "test.npz", x_test[:TEST_COUNT], y_test[:TEST_COUNT])


def check_size(paths: list[Path], limit: int, what: str) -> None:
    """Fail loudly if shipped files outgrow their budget (they live in git)."""
    total = sum(p.stat().st_size for p in paths)
    print(f"{what}: {total / 1024:.1f} KiB (limit {limit / 1024:.0f} KiB)")
    if total >= limit:
        raise RuntimeError(f"{what} too large: {total} bytes >= {limit}")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", type=Path, default=DATA_DIR)
    p.add_argument("--out-dir", type=Path, default=HERE)
    p.add_argument("--epochs", type=int, default=TrainConfig.epochs)
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args()


def main() -> None:
    args = parse_args()
    # Seeded init/shuffling plus deterministic kernels make a rebuild reproduce the shipped
    # weights, given the same torch version and thread count.
    torch.manual_seed(SEED)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)

    x_train, y_train = load_split(args.data_dir, "train")
    x_test, y_test = load_split(args.data_dir, "t10k")
    print(f"train {x_train.shape}, test {x_test.shape}")

    model = FashionCNN()
    for name, shape, params in layer_table(model):
        print(f"  {name:<12} {str(list(shape)):<14} {params:>6}")
    print(f"parameters: {count_params(model)}")

    start = time.perf_counter()
    train(
        model,
        torch.from_numpy(x_train),
        torch.from_numpy(y_train).long(),
        TrainConfig(epochs=args.epochs),
        torch.from_numpy(x_test),
        torch.from_numpy(y_test).long(),
    )
    print(f"training time: {time.perf_counter() - start:.0f} s")

    args.out_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = args.out_dir / "fashion_cnn.onnx"
    onnx.save(build_onnx(model), str(onnx_path))
    session = open_session(onnx_path)
    check_against_torch(session, model, x_test[:100])
    acc_full = ort_accuracy(session, x_test, y_test)
    acc_1k = ort_accuracy(session, x_test[:TEST_COUNT], y_test[:TEST_COUNT])
    print(f"ONNX test accuracy: {acc_full:.4f} on {len(x_test)} images, {acc_1k:.4f} on test.npz")

    write_datasets(args.out_dir, x_train, y_train, x_test, y_test)
    check_size([onnx_path], MAX_MODEL_BYTES, "model")
    check_size([args.out_dir / "calib.npz", args.out_dir / "test.npz"], MAX_NPZ_BYTES, "npz")


if __name__ == "__main__":
    main()
