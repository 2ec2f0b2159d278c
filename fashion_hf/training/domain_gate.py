"""The gate of an ensemble with expert members: a linear classifier that tells which kind of photo it sees.

Its input is what the ensemble computes anyway, the mean of its general members' embeddings (`domain_weights`),
so a catalogue photo costs no expert encoder pass. It is fitted once the members are trained, as multinomial
logistic regression (L-BFGS) on standardised embeddings, and the standardisation is folded into its weights.
"""

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..modeling_fashion_tagger import FashionTaggerEnsembleModel


@torch.inference_mode()
def gate_inputs(model: FashionTaggerEnsembleModel, processor, dataset, batch_size: int = 64, progress: bool = True):
    """`(len(dataset), width)`: per photo of `dataset` (an `image` column), the mean of the general members' views
    of it, which is what the gate reads."""
    general = model.config.members_of(model.config.domains[0])
    dtype = next(model.parameters()).dtype
    chunks = []
    batches = dataset.with_format(None).select_columns(["image"]).iter(batch_size=batch_size)
    for batch in tqdm(batches, desc="gate inputs", total=-(-len(dataset) // batch_size), disable=not progress):
        pixel_values = processor(batch["image"], return_tensors="pt")["pixel_values"].to(dtype)
        embeds = [model.encode_member_views(index, pixel_values) for index in general]
        chunks.append(torch.cat(embeds).float().mean(0))
    return torch.cat(chunks)


def fit_gate(inputs: torch.Tensor, domains: torch.Tensor, num_domains: int, l2: float = 1e-4, steps: int = 200):
    """Weights `(num_domains, width)` and bias `(num_domains,)` of the gate that predicts `domains` (one index per
    row of `inputs`). Each domain counts equally, however many photos it has: the catalogue sample is larger."""
    if inputs.shape[0] != domains.shape[0]:
        raise ValueError(f"{inputs.shape[0]} gate inputs for {domains.shape[0]} domain labels")
    missing = sorted(set(range(num_domains)) - set(domains.tolist()))
    if missing:
        raise ValueError(f"the gate needs photos of every domain; none of domain(s) {missing}")
    inputs = inputs.double()
    mean, std = inputs.mean(0), inputs.std(0).clamp_min(1e-6)
    standardised = (inputs - mean) / std
    class_weights = (len(domains) / (num_domains * torch.bincount(domains, minlength=num_domains))).double()
    weight = torch.zeros(num_domains, inputs.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_domains, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=steps, line_search_fn="strong_wolfe")

    def objective():
        optimizer.zero_grad()
        loss = F.cross_entropy(standardised @ weight.T + bias, domains, weight=class_weights) + l2 * weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(objective)
    with torch.no_grad():  # gate(x) = ((x - mean) / std) @ W.T + b, written as x @ W'.T + b'
        folded = weight / std
        return folded.float(), (bias - folded @ mean).float()


def set_gate(model: FashionTaggerEnsembleModel, weight: torch.Tensor, bias: torch.Tensor) -> None:
    with torch.no_grad():
        model.gate.weight.copy_(weight)
        model.gate.bias.copy_(bias)


def routing_rates(model: FashionTaggerEnsembleModel, inputs: torch.Tensor, domains: torch.Tensor) -> dict[str, dict]:
    """Per true domain: how many photos, and the share that reaches each domain's members (weight above the
    skipping threshold) and the mean weight each domain gets: how well the gate tells the photos apart."""
    with torch.no_grad():
        weights = model._gate_weights(inputs[:, None].to(model.gate.weight.dtype))
    rates = {}
    for index, domain in enumerate(model.config.domains):
        rows = domains == index
        if rows.any():
            rates[domain] = {
                "photos": int(rows.sum()),
                "reaches": {name: round(float((weights[rows, i] > 0).float().mean()), 4) for i, name in enumerate(model.config.domains)},
                "mean_weight": {name: round(float(weights[rows, i].mean()), 4) for i, name in enumerate(model.config.domains)},
            }
    return rates
