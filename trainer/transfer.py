"""Transfer learning: start from other weights, replace the classifier, freeze what should not learn,
and — when only the head learns — compute the frozen backbone's activations once and train on them.

Works on any model whose classifier is its last ``nn.Linear`` (every model of the zoo, torchvision's
and timm's): the cached activations are that layer's inputs, captured with a forward hook.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time

import numpy as np
import torch
from torch import nn

from augserve.atomic import atomic_write

from . import checkpoint as ckpt

log = logging.getLogger("trainer.transfer")


def classifier_of(model: nn.Module) -> tuple[str, nn.Linear]:
    """(qualified name, module) of the final classifier: the last ``nn.Linear`` in registration order."""
    found = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            found = (name, module)
    if found is None:
        raise ValueError(f"{type(model).__name__} has no nn.Linear classifier to replace")
    return found


def load_pretrained(model: nn.Module, path: str) -> dict:
    """Load weights from a trainer checkpoint or a torchvision/timm state-dict file (no download).

    Tensors whose shape differs — the old classifier, sized for other classes — are left as initialised:
    that *is* the classifier replacement. Returns counts of loaded / replaced / unused tensors.
    """
    state = {key.removeprefix("module."): value for key, value in ckpt.model_state(ckpt.load(path)).items()}  # DDP-saved weights
    own = model.state_dict()
    if not set(own) & set(state):
        state = _by_position(state, own, path)
    loaded, replaced = {}, []
    for key, value in state.items():
        if key in own and own[key].shape == value.shape:
            loaded[key] = value
        elif key in own:
            replaced.append(key)
    if not loaded:
        raise ValueError(f"no weights in {path} match {type(model).__name__}: is it a checkpoint of another architecture?")
    model.load_state_dict(loaded, strict=False)
    unused = len(state) - len(loaded) - len(replaced)
    log.info("pretrained %s: %d tensors loaded, %d replaced (new classes), %d unused", path, len(loaded), len(replaced), unused)
    return {"loaded": len(loaded), "replaced": replaced, "unused": unused}


def has_batch_norm(path: str) -> bool:
    """Whether the weights in ``path`` (as :func:`load_pretrained` reads them) hold BatchNorm layers.
    Mapped, not read: :func:`load_pretrained` reads the file afterwards, and a VGG's is 0.5 GB."""
    return any(key.endswith("running_mean") for key in ckpt.model_state(ckpt.load(path, mapped=True)))


def _by_position(state: dict, own: dict, path: str) -> dict:
    """Rename another library's tensors to ours when the architectures match layer for layer.

    torchvision names AlexNet's classifier ``classifier.1/4/6`` and GoogLeNet's convs ``conv1.conv``
    where ours say ``pre_logits.1``/``fc`` and ``conv1.0``; the tensors come in the same order with the same
    shapes. Pairing by position is safe only then: every shape must agree except the final classifier's.
    """
    source, target = list(state.items()), list(own.items())
    if len(source) != len(target):
        raise ValueError(f"weights in {path} have {len(source)} tensors, {len(target)} expected: another architecture?")
    for index, ((their_key, theirs), (our_key, ours)) in enumerate(zip(source, target)):
        if theirs.shape != ours.shape and index < len(source) - 2:
            raise ValueError(f"weights in {path} do not match layer by layer ({their_key} {tuple(theirs.shape)} vs {our_key} {tuple(ours.shape)})")
    return {our_key: value for (_, value), (our_key, _) in zip(source, target)}


def stages_of(model: nn.Module) -> list[nn.Module]:
    """Top-level children holding parameters, in order, without the classifier's branch."""
    classifier_name = classifier_of(model)[0].split(".")[0]
    return [module for name, module in model.named_children() if name != classifier_name and any(True for _ in module.parameters())]


def freeze(model: nn.Module, mode: str) -> None:
    """``none``: everything learns. ``head``: only the classifier. ``last:K``: the last K stages + head."""
    if mode == "none":
        return
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    trainable: list[nn.Module] = [classifier_of(model)[1]]
    if mode.startswith("last:"):
        try:
            count = int(mode.split(":", 1)[1])
        except ValueError:
            raise ValueError(f"--freeze last:K needs an integer K, got {mode!r}") from None
        stages = stages_of(model)
        if not 0 <= count <= len(stages):
            raise ValueError(f"--freeze {mode}: {type(model).__name__} has {len(stages)} stages")
        trainable += stages[len(stages) - count :] if count else []
    elif mode != "head":
        raise ValueError(f"--freeze must be none, head or last:K, got {mode!r}")
    for module in trainable:
        for parameter in module.parameters():
            parameter.requires_grad_(True)


def keep_frozen_in_eval(model: nn.Module) -> None:
    """Frozen parts stay in eval mode during training: their BatchNorm statistics must not drift."""
    for module in model.modules():
        parameters = list(module.parameters(recurse=True))
        if parameters and not any(p.requires_grad for p in parameters):
            module.eval()


# --- the cached-activation path -------------------------------------------------------------------------


def cache_key(config, spec_dict: dict) -> str:
    stat = os.stat(config.pretrained)
    material = json.dumps([config.model, config.dataset, config.dataset_options, spec_dict, os.path.abspath(config.pretrained), stat.st_size, stat.st_mtime_ns], sort_keys=True)
    return hashlib.sha256(material.encode()).hexdigest()[:16]


def write_feature_cache(path: str, features: np.ndarray, labels: np.ndarray) -> None:
    """Store (features N×D float32, labels N) as an ``.npz`` written atomically: concurrent runs or a
    crash leave the old cache or the new one. No ``.prev``: the name is a content key, a miss recomputes."""
    atomic_write(path, lambda handle: np.savez(handle, features=features, labels=labels), keep_previous=False)


def read_feature_cache(path: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(features, labels) of a cache written by :func:`write_feature_cache`, or None when there is none
    or it is unreadable (truncated, foreign, inconsistent) — then it is recomputed and overwritten."""
    if not os.path.exists(path):
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            features, labels = data["features"], data["labels"]
    except Exception as exc:
        log.warning("feature cache %s is unreadable (%s: %s); recomputing it", path, type(exc).__name__, str(exc)[:200])
        return None
    if features.ndim != 2 or labels.ndim != 1 or len(features) != len(labels) or features.dtype != np.float32:
        log.warning("feature cache %s holds %s features for %s labels; recomputing it", path, features.shape, labels.shape)
        return None
    return features, labels


@torch.no_grad()
def compute_features(model: nn.Module, batches, precision) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inputs of the classifier for every sample: (features float32 N×D, labels, sample ids)."""
    _, classifier = classifier_of(model)
    captured = []
    hook = classifier.register_forward_hook(lambda module, inputs, output: captured.append(inputs[0].detach().float().cpu()))
    model.eval()
    features, labels, ids = [], [], []
    try:
        for batch in batches:
            captured.clear()
            with precision.autocast():
                model(precision.prepare(batch.images))
            features.append(captured[-1].numpy())
            labels.append(batch.labels.numpy())
            ids.append(batch.sample_ids.numpy())
    finally:
        hook.remove()
    return np.concatenate(features), np.concatenate(labels), np.concatenate(ids)


def fit_head_on_cached_features(run, model: nn.Module, address: str, metrics) -> dict:
    """Train only the classifier on cached backbone activations; the backbone runs once per cache."""
    import pipelines

    from .data import eval_spec
    from .loop import EpochStats

    config = run.config
    spec = eval_spec(pipelines.resolve(config.pipeline))
    folder = os.path.join(config.out or ".", "feature-cache")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{config.model}-{config.dataset}-{cache_key(config, spec.to_dict())}.npz")
    cached = read_feature_cache(path)
    if cached is not None:
        features, labels = cached
        cache = {"feature_cache": path, "feature_cache_hit": True, "backbone_passes": 0}
    else:
        stream = run._connect(address, pipeline=spec, epochs=1, shuffle=False, ordered=True, batch_size=config.eval_batch_size)
        try:
            features, labels, _ids = compute_features(model, stream, run.precision)
        finally:
            stream.close()
        write_feature_cache(path, features, labels)
        cache = {"feature_cache": path, "feature_cache_hit": False, "backbone_passes": 1}
    _, classifier = classifier_of(model)
    optimizer = torch.optim.SGD(classifier.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    features_t, labels_t = torch.from_numpy(features).to(run.device), torch.from_numpy(labels).long().to(run.device)
    generator = torch.Generator().manual_seed(config.seed)
    run.optimizer = optimizer
    run.model = model
    for epoch in range(config.epochs):
        stats, started = EpochStats(), time.perf_counter()
        classifier.train()
        for chunk in torch.randperm(len(labels_t), generator=generator).split(config.batch_size):
            chunk = chunk.to(run.device)
            logits = classifier(features_t[chunk])
            loss = nn.functional.cross_entropy(logits, labels_t[chunk], label_smoothing=config.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            stats.add(loss.item(), int((logits.argmax(1) == labels_t[chunk]).sum()), len(chunk))
            run.step += 1
        elapsed = time.perf_counter() - started
        val = run.evaluate()
        row = {"epoch": epoch + 1, "step": run.step, "train_loss": stats.loss, "train_accuracy": stats.accuracy, "val_accuracy": val, "lr": config.lr, "img_per_s": stats.seen / max(elapsed, 1e-9), "stall_pct": 0.0, "elapsed_s": elapsed}
        run.history.append(row)
        metrics.epoch(row)
    return cache
