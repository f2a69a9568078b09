"""`lanner train-draft`: train an EAGLE-style draft head for a target model on its own generations.

1. Self-distillation data: the target answers the shipped open-chat prompts (lanner.spec.chat_prompts) through
   its chat template, greedy, on lanner's own engine; a prefill pass over prompt + answer keeps the target's
   final hidden state at every position.
2. A reduced vocabulary: the head scores only the answers' most frequent tokens (FR-Spec's observation: the
   LM head is most of a small draft's cost, and a few thousand tokens cover nearly all of chat).
3. Training: the head starts as the identity on the feature (initialize); loss = cross-entropy against the
   target's own next-token distribution (its LM head on its hidden state: distillation, richer than the greedy
   token alone) + a smooth-L1 pull towards its hidden states, over `steps` unrolled draft
   positions (DraftHead.unroll: later positions read the head's own outputs, as when served).
4. Held-out acceptance: the exact greedy chain acceptance (accepted tokens per verify step, k drafts) on
   prompts never trained on, after every epoch; early stopping on it. Curves go to a PNG beside the head.
"""
import json
import math
import os
import random
import sys
import time

import torch
from tqdm import tqdm

from lanner.spec.chat_prompts import chat_prompts
from lanner.spec.eagle import ADAPTER_HEAD, DraftHead, HeadConfig, load_head, save_head


def run(args) -> int:
    if args.held_out < 1 or args.num_prompts < 1:
        raise ValueError("train-draft needs --num-prompts >= 1 and --held-out >= 1 (acceptance is measured on it)")
    torch.manual_seed(args.seed)
    data = load_or_make_data(args)
    head, vocab_ids, history = train(data, args)
    config = data["config"]
    config.training = {"command": "lanner " + " ".join(sys.argv[1:]), "prompts": args.num_prompts,
                       "held_out": args.held_out, "tokens": sum(len(t) for t in data["tokens"]),
                       "vocab": len(vocab_ids), "steps": args.steps, "history": history}
    save_head(args.output, config, head.state_dict(), vocab_ids)
    plot_history(history, os.path.join(args.output, "training.png"))
    best = max(history, key=lambda h: h["acceptance_length"])
    print(json.dumps({"head": args.output, "epochs": len(history), "held_out_acceptance_length":
                      best["acceptance_length"], "by_position": best["by_position"]}))
    return 0


def adapt_head(model: str | None, adapter: str, records: list[dict], base_head: str, max_lora_rank: int = 64,
               **options) -> dict:
    """`lanner finetune --with-draft`: continue the base head on the adapted target's answers to the prompts of
    the adapter's training records; written to ADAPTER/draft_head, which the engine drafts with for that
    adapter's requests."""
    from lanner.lora.finetune import prompt_and_completion
    from lanner.spec.cli import default_args
    args = default_args(output=os.path.join(adapter, ADAPTER_HEAD), **options)
    if len(records) < 2:
        raise ValueError("--with-draft needs at least 2 training records (one is held out to measure acceptance)")
    args.held_out = max(1, min(args.held_out, len(records) // 5))
    data = make_data(model, lambda tok: [prompt_and_completion(r, tok)[0] for r in records], args.max_tokens, adapter,
                     max_lora_rank)
    head, vocab_ids, history = train(data, args, start=base_head)
    config = data["config"]
    config.training = {"command": "lanner " + " ".join(sys.argv[1:]), "adapter": adapter, "from": base_head,
                       "prompts": len(records), "held_out": args.held_out, "history": history}
    save_head(args.output, config, head.state_dict(), vocab_ids)
    plot_history(history, os.path.join(args.output, "training.png"))
    return {"head": args.output, "before": history[0]["acceptance_length"],
            "after": max(h["acceptance_length"] for h in history)}


# ---- data ------------------------------------------------------------------------------------------------
def load_or_make_data(args) -> dict:
    if args.data and os.path.exists(args.data):
        print(f"lanner: reusing the generated data in {args.data}", file=sys.stderr)
        data = torch.load(args.data, weights_only=False)
        data["config"] = HeadConfig(**data["config"])
        return data
    texts = chat_prompts(args.seed)[:args.num_prompts + args.held_out]
    data = make_data(args.model, lambda tok: [as_chat(tok, t) for t in texts], args.max_tokens)
    if args.data:
        torch.save(data | {"config": data["config"].__dict__}, args.data)
    return data


def as_chat(tokenizer, text: str) -> str:
    """The prompt in the model's chat template (the text itself for a model without one)."""
    if not tokenizer.chat_template:
        return text
    return tokenizer.apply_chat_template([{"role": "user", "content": text}])


def make_data(model: str | None, make_prompts, max_tokens: int, adapter: str | None = None,
              max_lora_rank: int = 64) -> dict:
    """The target's greedy answers to make_prompts(tokenizer) (with a LoRA adapter: the adapted target's), with
    its final hidden state at every position."""
    from lanner import LLM, LoRARequest, SamplingParams
    # a batch whose KV fits the pool: more sequences at once would be preempted and recomputed
    llm = LLM(model, dtype="float32", enable_prefix_caching=False, max_num_seqs=128, kv_cache_memory=3.0,
              enable_lora=adapter is not None, max_lora_rank=max_lora_rank)
    engine = llm.engine
    lora = LoRARequest("target", 1, adapter) if adapter else None
    outputs = llm.generate(make_prompts(engine.tokenizer), SamplingParams(temperature=0, max_tokens=max_tokens), lora_request=lora)
    tokens = [o.prompt_token_ids + o.outputs[0].token_ids for o in outputs]
    features = target_features(engine, tokens, engine.register_lora(lora) if lora else 0)
    model_ = engine.runner.model
    return {"tokens": tokens, "num_prompt_tokens": [len(o.prompt_token_ids) for o in outputs],
            "features": features, "config": HeadConfig.for_target(engine.model_config, os.path.basename(engine.model_path)),
            "embedding": model_.embed_tokens(torch.arange(engine.model_config.vocab_size)).float(),
            "lm_head": dense_lm_head(model_)}


@torch.inference_mode()
def target_features(engine, token_lists: list[list[int]], lora_id: int = 0, budget: int = 2048) -> list[torch.Tensor]:
    """The target's final hidden state at every position of each token list: packed prefill passes."""
    from lanner import SamplingParams
    from lanner.engine.sequence import Sequence
    features, order = [None] * len(token_lists), list(range(len(token_lists)))
    bar = tqdm(total=len(order), desc="target features")
    while order:
        group, size = [], 0
        while order and (not group or size + len(token_lists[order[0]]) <= budget):
            size += len(token_lists[order[0]])
            group.append(order.pop(0))
        seqs = [Sequence("features", token_lists[i], SamplingParams(max_tokens=1), lora_id) for i in group]
        for seq in seqs:
            engine.blocks.allocate(seq, seq.num_tokens)
        engine.runner.run([(seq, seq.num_tokens) for seq in seqs], every_hidden=True)
        for i, rows in zip(group, engine.runner.last_hidden.split([s.num_tokens for s in seqs])):
            features[i] = rows.float().clone()
        for seq in seqs:
            engine.blocks.release(seq)
        bar.update(len(group))
    bar.close()
    return features


def dense_lm_head(model) -> torch.Tensor:
    head = model.lm_head
    return (head.blocks.dequantize() if head.blocks is not None else head.weight.detach()).float()


# ---- training --------------------------------------------------------------------------------------------
def frequent_tokens(data: dict, train_ids: list[int], n: int) -> torch.Tensor:
    counts = torch.zeros(data["lm_head"].shape[0], dtype=torch.long)
    for i in train_ids:
        answer = torch.tensor(data["tokens"][i][data["num_prompt_tokens"][i]:])
        counts += torch.bincount(answer, minlength=counts.numel())
    return counts.argsort(descending=True)[:min(n, int((counts > 0).sum()))].sort().values


def batches(ids: list[int], lengths: list[int], batch_tokens: int, shuffle: random.Random | None):
    """Groups of similar length, about batch_tokens padded tokens each."""
    ids = sorted(ids, key=lambda i: lengths[i])
    groups, group = [], []
    for i in ids:
        if group and (len(group) + 1) * lengths[i] > batch_tokens:
            groups.append(group)
            group = []
        group.append(i)
    groups.append(group)
    if shuffle:
        shuffle.shuffle(groups)
    return groups


def collate(data: dict, group: list[int], steps: int, vocab_index: torch.Tensor):
    """Padded inputs and, per unrolled step j, targets: features h_{p+j}, tokens x_{p+j+1} as indices in the
    head's vocabulary (-100: not in it), and whether x_{p+j+1} is an answer token (the rows that count)."""
    T = max(len(data["tokens"][i]) for i in group)
    H = data["lm_head"].shape[1]
    tokens = torch.zeros(len(group), T, dtype=torch.long)
    feats = torch.zeros(len(group), T, H)
    answer = torch.zeros(len(group), T, dtype=torch.bool)
    for b, i in enumerate(group):
        n = len(data["tokens"][i])
        tokens[b, :n] = torch.tensor(data["tokens"][i])
        feats[b, :n] = data["features"][i]
        answer[b, data["num_prompt_tokens"][i]:n] = True
    inputs = torch.cat([torch.zeros(len(group), 1, H), feats[:, :-1]], dim=1)   # h_{p-1}, zeros at p = 0
    targets = []
    for j in range(steps):
        want_feat = shift(feats, j)
        want_tok = shift(vocab_index[tokens], j + 1, fill=-100)   # -100 too where the head cannot say it
        targets.append((want_feat, want_tok, shift(answer, j + 1, fill=False)))
    return tokens, inputs, targets


def shift(x: torch.Tensor, by: int, fill=0) -> torch.Tensor:
    """x[:, p + by] at p (fill past the end)."""
    if by == 0:
        return x
    pad = torch.full_like(x[:, :by], fill)
    return torch.cat([x[:, by:], pad], dim=1)


def train(data: dict, args, start: str | None = None):
    """start: a head directory to continue from (its weights and vocabulary), else a fresh head."""
    num = len(data["tokens"])
    held_out, train_ids = list(range(num - args.held_out, num)), list(range(num - args.held_out))
    if start:
        _, weights, vocab_ids = load_head(start)
    else:
        vocab_ids = frequent_tokens(data, train_ids, args.vocab)
    vocab_index = torch.full((data["lm_head"].shape[0],), -100, dtype=torch.long)
    vocab_index[vocab_ids] = torch.arange(len(vocab_ids))
    lm_head = data["lm_head"][vocab_ids]
    head = DraftHead(data["config"], len(vocab_ids))
    if start:
        head.load_state_dict(weights)
    else:
        initialize(head)
    lengths = [len(t) for t in data["tokens"]]
    rng = random.Random(args.seed)
    per_epoch = len(batches(train_ids, lengths, args.batch_tokens, None))
    optimizer = torch.optim.AdamW(head.parameters(), lr=args.lr, weight_decay=0.0)
    total = per_epoch * args.epochs
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    history, best, best_state, stale = [], -1.0, None, 0
    if start:   # the starting point is the bar to beat
        history.append({"epoch": 0, "loss": None, **acceptance(head, data, held_out, args.num_speculative_tokens,
                                                                vocab_index, lm_head), "minutes": 0.0})
        best, best_state = history[0]["acceptance_length"], {k: v.clone() for k, v in head.state_dict().items()}
    started = time.perf_counter()
    for epoch in range(args.epochs):
        head.train()
        losses = []
        bar = tqdm(batches(train_ids, lengths, args.batch_tokens, rng), desc=f"epoch {epoch + 1}/{args.epochs}")
        for group in bar:
            loss = step_loss(head, data, group, args.steps, vocab_index, lm_head)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
        accepted = acceptance(head, data, held_out, args.num_speculative_tokens, vocab_index, lm_head)
        history.append({"epoch": epoch + 1, "loss": sum(losses) / len(losses), **accepted,
                        "minutes": (time.perf_counter() - started) / 60})
        print(json.dumps(history[-1]), file=sys.stderr)
        if accepted["acceptance_length"] > best:
            best, stale = accepted["acceptance_length"], 0
            best_state = {k: v.clone() for k, v in head.state_dict().items()}
        else:
            stale += 1
        if stale >= args.patience or history[-1]["minutes"] * (epoch + 2) / (epoch + 1) > args.time_limit:
            break
    head.load_state_dict(best_state)
    return head, vocab_ids, history


def initialize(head: DraftHead) -> None:
    """Start as the identity on the feature: fc passes h_{p-1} through, the layer's output projections are zero
    (so the residual stream is the feature), everything else small. (A copy of the target's last layer, tried
    first, has outputs 7x the features' norm: cross-entropy ~100 at step one.)"""
    with torch.no_grad():
        for name, p in head.named_parameters():
            if "norm" not in name:
                torch.nn.init.normal_(p, std=0.02)
        for p in (head.layers[0].self_attn["o_proj"].weight, head.layers[0].mlp["down_proj"].weight):
            p.zero_()
        hidden = head.fc.weight.shape[0]
        head.fc.weight[:, hidden:] += torch.eye(hidden)


def step_loss(head: DraftHead, data: dict, group: list[int], steps: int, vocab_index, lm_head) -> torch.Tensor:
    tokens, inputs, targets = collate(data, group, steps, vocab_index)
    outputs = head.unroll(data["embedding"][tokens], inputs, steps)
    total = 0.0
    for j, (out, (want_feat, _, answer)) in enumerate(zip(outputs, targets)):
        if not answer.any():
            continue
        # distillation: the target's own distribution over the head's vocabulary, from its hidden state
        target = torch.softmax(want_feat[answer] @ lm_head.T, dim=-1)
        ce = -(target * torch.log_softmax(out[answer] @ lm_head.T, dim=-1)).sum(-1).mean()
        pull = torch.nn.functional.smooth_l1_loss(out[answer], want_feat[answer])
        total = total + 0.8 ** j * (ce + 0.2 * pull)
    return total


@torch.no_grad()
def acceptance(head: DraftHead, data: dict, ids: list[int], k: int, vocab_index, lm_head) -> dict:
    """Greedy chain acceptance on held-out answers: at every answer position, how many of k drafts equal the
    target's next tokens (the drafts after a wrong one do not count, as when verified)."""
    head.eval()
    accepted, origins, by_position = 0, 0, [0] * k
    for group in batches(ids, [len(t) for t in data["tokens"]], 4096, None):
        tokens, inputs, targets = collate(data, group, k, vocab_index)
        outputs = head.unroll(data["embedding"][tokens], inputs, k)
        run = None
        for j, (out, (_, want_tok, answer)) in enumerate(zip(outputs, targets)):
            hit = ((out @ lm_head.T).argmax(-1) == want_tok) & answer
            if j == 0:
                run = hit
                origins += int(answer.sum())
            else:
                run = run & hit
            by_position[j] += int(run.sum())
            accepted += int(run.sum())
    return {"acceptance_length": 1 + accepted / max(1, origins),
            "by_position": [round(c / max(1, origins), 4) for c in by_position]}


def plot_history(history: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    epochs = [h["epoch"] for h in history]
    left.plot([h["epoch"] for h in history if h["loss"] is not None],
              [h["loss"] for h in history if h["loss"] is not None], marker="o")
    left.set(xlabel="epoch", ylabel="training loss", title="loss")
    right.plot(epochs, [h["acceptance_length"] for h in history], marker="o", label="mean accepted length")
    for j in range(len(history[0]["by_position"])):
        right.plot(epochs, [h["by_position"][j] for h in history], linestyle="--", label=f"P(draft {j + 1} accepted)")
    right.set(xlabel="epoch", title="held-out greedy acceptance")
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
