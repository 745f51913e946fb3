"""Spartan training: SGD interleaved with mutation rounds scored on data SGD never sees; and pure ES.

Every `mutate_every` epochs the parent w breeds K children, scored on the evolution split:
  es   (Salimans et al. 2017, OpenAI-ES): child k = w + s sigma eps_k (s = +/-1 for antithetic pairs);
       rewards r shaped ((r - mean) / std, or centered ranks); w <- w + es_lr / (K sigma) sum_k r_k eps_k,
       fused: eps_k is regenerated from (seed, k) inside fastflat.ops.noise.weighted_noise_sum_.
  grad ("random gradients"): child k = w - grad_lr * T * u_k * g, u_k ~ U(0, 1) per weight from the
       counter RNG, g the gradient on the evolution split, T = T0 * parent_loss / first_parent_loss;
       the best child replaces the parent only if its loss is lower.
Round r draws its noise with seed (cfg.seed, r): a resumed run regenerates the same children.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from fastflat.ops import noise
from fastflat.errors import UserError
from fastflat.loss.evaluation import at_least_fp32
from fastflat.errors import finite_or_raise
from fastflat.flat import FlatParams
from fastflat.methods.base import Closure, Method, RunServices
from fastflat.methods.population import population_scores
from fastflat.methods.wrappers import Wrapper
from fastflat.settings import enum_of, setting

if TYPE_CHECKING:  # annotations only: the config is assembled above the methods
    from fastflat.config import TrainConfig

EVOLUTION = "Spartan and ES"  # their options' help panel
Mutation = enum_of("Mutation", "es", "grad")
Noise = enum_of("Noise", "normal", "uniform")
Shaping = enum_of("Shaping", "normalize", "ranks")
Fitness = enum_of("Fitness", "loss", "acc")


@dataclass(frozen=True)
class SpartanConfig:
    mutation: str = setting("es", "Spartan mutation: es (OpenAI-ES update) | grad (random-gradient children, the best "
                            "replaces the parent).", option="mutation", choices=Mutation)
    mutate_every: int = setting(1, "Epochs between mutation rounds.", option="mutate_every")
    children: int = setting(16, "Children K per round (even with --antithetic).", option="children")
    noise: str = setting("normal", "ES noise: normal, or uniform U[-1, 1] (the article's ES experiment).", option="es_noise",
                         choices=Noise)
    sigma: float = setting(0.01, "ES noise scale, in weight units.", option="sigma")
    es_lr: float = setting(2e-5, "ES step: w += es_lr / (K sigma) sum_k r_k eps_k (with shaped rewards each weight "
                           "moves about es_lr / (sqrt(K) sigma)).", option="es_lr")
    antithetic: bool = setting(True, "ES children in +/- pairs sharing one eps_k.", option="antithetic")
    shaping: str = setting("normalize", "ES reward shaping: (r - mean) / std, or centered ranks in [-0.5, 0.5].",
                           option="shaping", choices=Shaping)
    fitness: str = setting("loss", "Fitness on the evolution split: loss or accuracy.", option="fitness", choices=Fitness)
    evolution_split: float = setting(0.1, "Share of training data held out for fitness; SGD never sees it.",
                                     option="evolution_split")
    fitness_examples: int = setting(2048, "Examples of the evolution split scored per round (0 = all).",
                                    option="fitness_examples")
    grad_lr: float = setting(0.05, "grad mutation: child = w - grad_lr * T * u * g, u ~ U(0, 1) per weight.", option="grad_lr")
    temperature: float = setting(1.0, "grad mutation temperature T0 (T = T0 * parent loss / first parent loss).",
                                 option="temperature")
    chunk: int = setting(8, "Children scored at once with torch.func.vmap (1 = one at a time).", option="chunk")

    def check(self, cfg: Any, need: Any) -> None:
        need(self.mutate_every >= 1, "mutate_every", "must be at least 1")
        need(self.children >= 2 and (not self.antithetic or self.children % 2 == 0), "children",
             "must be >= 2, and even with antithetic sampling")
        for key in ("sigma", "es_lr", "grad_lr", "temperature"):
            need(getattr(self, key) > 0, key, "must be > 0")
        need(self.fitness_examples >= 0, "fitness_examples", "must be >= 0 (0 = the whole split)")
        need(self.chunk >= 1, "chunk", "must be >= 1")


def round_seed(seed: int, round_index: int) -> int:
    """The noise key of one mutation round (or ES generation), distinct for every (seed, round)."""
    return (seed * 1_000_003 + round_index + 1) % 2**63


def shape_rewards(rewards: Tensor, how: str) -> Tensor:
    """(K,) fp32: (r - mean) / std, or centered ranks in [-0.5, 0.5]; a constant r gives exact zeros.

    Normalisation runs in fp64: in fp32 the mean of K equal values can differ from them by an ulp,
    and dividing that by a std of ~0 (+1e-8) turned "no signal" into a step of order one."""
    constant = rewards.max() == rewards.min()
    if how == "ranks":
        ranks = torch.empty_like(rewards)
        ranks[rewards.argsort()] = torch.arange(len(rewards), device=rewards.device, dtype=rewards.dtype)
        shaped = ranks / max(len(rewards) - 1, 1) - 0.5
    else:
        r = rewards.double()
        shaped = ((r - r.mean()) / (r.std(unbiased=False) + 1e-8)).to(rewards.dtype)
    return torch.where(constant, torch.zeros_like(shaped), shaped)


def es_update_(flat: FlatParams, cfg: TrainConfig, seed: int, batches: list[tuple[Tensor, Tensor]]) -> dict[str, Any]:
    """One OpenAI-ES generation on flat.params[0], children scored on `batches`; returns the scores."""
    sp = cfg.spartan
    w = flat.params[0]
    parent = w.detach().clone()  # children are built from this; w itself is updated at the end
    k = sp.children
    device = w.device
    if sp.antithetic:
        members = torch.arange(k // 2, device=device).repeat_interleave(2)  # 0 0 1 1 ...: one eps per pair
        signs = [1, -1] * (k // 2)
    else:
        members, signs = torch.arange(k, device=device), [1] * k
    member_ids = members.tolist()

    def write_child(i: int, out: Tensor) -> None:
        noise.perturb_into_(out, parent, seed, member_ids[i], sp.sigma, sp.noise, signs[i])

    loss, acc = population_scores(flat, write_child, k, batches, sp.chunk)
    finite_or_raise({"ES fitness": loss})  # before w moves: a NaN child must not poison the update
    rewards = -loss if sp.fitness == "loss" else acc
    shaped = shape_rewards(rewards.float(), sp.shaping)
    if sp.antithetic:  # -eps for the second child of a pair: sum_k r_k (s_k eps_k) = sum_pairs (r+ - r-) eps
        coeffs, members = shaped[0::2] - shaped[1::2], members[0::2]
    else:
        coeffs = shaped
    noise.weighted_noise_sum_(w, seed, members.contiguous(), coeffs.float().contiguous(),
                              sp.es_lr / (k * sp.sigma), sp.noise)
    return {"children_loss": loss, "children_acc": acc}


def parent_scores(flat: FlatParams, batches: list[tuple[Tensor, Tensor]]) -> tuple[float, float]:
    """(loss, accuracy %) of the current weights on `batches`, in eval mode."""
    loss, acc = population_scores(flat, lambda i, out: out.copy_(flat.params[0]), 1, batches, 1)
    return loss.item(), acc.item()


class Spartan(Wrapper):
    """The inner method trains; every `mutate_every` epochs a mutation round runs (see module doc)."""

    name = "spartan"
    summary = "Spartan: --inner trains; mutation rounds (ES or random gradients) scored on a held-out split."
    schedule_free_refusal = ("mutation rounds move the weights outside the optimizer: schedule-free's sequences "
                             "(z, and x its average) cannot follow them")
    config = SpartanConfig
    panel = EVOLUTION
    owns_lr = False  # the inner method's schedule applies
    fp16 = False
    holdout_salt = "holdout"  # the evolution split keeps its first salt: older runs resume on it

    @classmethod
    def check_config(cls, cfg: TrainConfig, need: Any) -> None:
        need(0 < cfg.spartan.evolution_split < 1, "spartan.evolution_split", "must be in (0, 1)")

    def __init__(self, cfg: TrainConfig, inner: Method):
        super().__init__(cfg, inner)
        self.rounds = 0
        self.first_parent_loss: float | None = None

    def holdout(self) -> tuple[str, float]:
        return "evolution", self.cfg.spartan.evolution_split  # fitness data that SGD never sees

    def init(self, flat: FlatParams, services: RunServices | None = None) -> None:
        if len(flat.vectors) != 1:
            raise UserError("spartan/es need all trainable parameters in one dtype on one device")
        super().init(flat, services)

    def end_epoch(self, flat: FlatParams, epoch: int) -> None:
        super().end_epoch(flat, epoch)
        if (epoch + 1) % self.cfg.spartan.mutate_every == 0:
            self.mutate(flat, epoch)

    @torch.no_grad()
    def mutate(self, flat: FlatParams, epoch: int) -> None:
        batches = self.services.holdout_batches("evolution", self.cfg.spartan.fitness_examples)
        seed = round_seed(self.cfg.seed, self.rounds)
        before_loss, before_acc = parent_scores(flat, batches)
        if self.cfg.spartan.mutation == "es":
            scores = es_update_(flat, self.cfg, seed, batches)
            replaced = True
        else:
            scores, replaced = self._grad_mutation(flat, seed, batches, before_loss)
        after_loss, after_acc = parent_scores(flat, batches)
        loss = scores["children_loss"]
        self.rounds += 1
        self.services.log_event({
            "round": self.rounds, "epoch": epoch + 1, "mutation": self.cfg.spartan.mutation,
            "parent_loss": before_loss, "parent_acc": before_acc,
            "children_best_loss": loss.min().item(), "children_mean_loss": loss.mean().item(),
            "children_best_acc": scores["children_acc"].max().item(), "replaced": replaced,
            "heldout_loss": after_loss, "heldout_acc": after_acc})

    def _grad_mutation(self, flat, seed, batches, parent_loss) -> tuple[dict[str, Any], bool]:
        sp = self.cfg.spartan
        if self.first_parent_loss is None:
            self.first_parent_loss = parent_loss
        temperature = sp.temperature * parent_loss / self.first_parent_loss
        grad = self._evolution_gradient(flat, batches)  # (N,)
        parent = flat.params[0].detach().clone()
        n = parent.numel()

        def write_child(i: int, out: Tensor) -> None:
            u = (noise.member_noise(seed, i, n, "uniform", device=parent.device) + 1) / 2  # U(0, 1)
            out.copy_(parent - sp.grad_lr * temperature * u * grad)

        loss, acc = population_scores(flat, write_child, sp.children, batches, sp.chunk)
        best = int(loss.argmin())
        replaced = bool(loss[best] < parent_loss)
        if replaced:  # only a strictly better child takes the parent's place
            write_child(best, flat.params[0])
        return {"children_loss": loss, "children_acc": acc}, replaced

    @staticmethod
    def _evolution_gradient(flat: FlatParams, batches) -> Tensor:
        model = flat.model
        was_training = model.training
        model.eval()  # BatchNorm statistics stay the parent's
        flat.zero_grad_()
        total = sum(len(y) for _, y in batches)
        with torch.enable_grad():
            for x, y in batches:
                (F.cross_entropy(at_least_fp32(model(x)), y, reduction="sum") / total).backward()
        model.train(was_training)
        return flat.grads[0].detach().clone()

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "rounds": self.rounds, "first_parent_loss": self.first_parent_loss}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.rounds, self.first_parent_loss = state["rounds"], state["first_parent_loss"]


class EvolutionStrategies(Method):
    """Pure ES, no gradients: every step is one OpenAI-ES generation scored on the current batch."""

    name = "es"
    summary = "Pure evolution strategies (OpenAI-ES): every step one generation, no gradients."
    schedule_free_refusal = "ES steps by --es-lr, not through the optimizer"
    config = SpartanConfig
    section = "spartan"
    panel = EVOLUTION
    swa_refusal = "ES steps by --es-lr, not the learning rate SWA cycles, and takes no gradient steps to average"
    splits_data = False
    batched = False
    fp16 = False

    def init(self, flat: FlatParams, services: RunServices | None = None) -> None:
        if len(flat.vectors) != 1:
            raise UserError("es needs all trainable parameters in one dtype on one device")
        self.services = services
        self.generations = 0

    def step(self, flat: FlatParams, closure: Closure, lr: float) -> dict[str, Any]:
        # torchrun: every rank holds the whole batch (splits_data False) and scores its share of the children
        loss = closure(backward=False)
        es_update_(flat, self.cfg, round_seed(self.cfg.seed, self.generations), closure.chunks)
        self.generations += 1
        return {"loss": loss}

    def state_dict(self) -> dict[str, Any]:
        return {"generations": self.generations}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generations = state["generations"]
