"""HellaSwag, completion style, on a small file in the real format.

Our scores equal a plain PyTorch reference: transformers' GPT-2 on the same weights and its own tokenizer
(built from the same BPE files), one example at a time, the loss of each ending's tokens summed and
averaged as build-nanogpt's hellaswag.py does. Also: the command line on a checkpoint, the Triton path,
the score during training, and one line with the line number for each malformed line.
"""

import json
import random
import shutil

import pytest
import torch
import torch.nn.functional as F
import transformers

from gpt.cli import main
from gpt.hellaswag import EvalConfig, ending_losses, evaluate, read_hellaswag, score
from gpt.pretrain import TrainConfig, train
from gpt.tokenizer import asset_path
from gpt.weights import load_hf, save_checkpoint

SUBJECTS = ["A man", "The woman", "A child", "Two people", "The chef", "A dog", "He", "She"]
VERBS = ["is sitting on a roof", "is cooking pasta", "walks to the river", "opens the door", "plays the guitar",
         "paints a fence", "lifts weights", "reads a book"]
ENDINGS = ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.", "starts pulling up roofing.",
           "puts the pot on the stove and stirs.", "smiles at the camera.", "falls asleep on the couch.",
           "throws the ball across the yard, and the dog runs after it.", "stops."]


def write_hellaswag(path, n: int, rng: random.Random) -> None:
    """``n`` examples with every field of the real file (hellaswag_val.jsonl)."""
    with open(path, "w") as f:
        for i in range(n):
            ctx_a = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)}."
            ctx_b = rng.choice(["he", "she", "then", ""])
            f.write(json.dumps({
                "ind": 24 + i, "activity_label": rng.choice(["Roof shingle removal", "Cooking", "Home and Garden"]),
                "ctx_a": ctx_a, "ctx_b": ctx_b, "ctx": f"{ctx_a} {ctx_b}".strip(), "split": "val",
                "split_type": rng.choice(["indomain", "zeroshot"]), "label": rng.randrange(4),
                "endings": rng.sample(ENDINGS, 4), "source_id": f"activitynet~v_{rng.getrandbits(32):x}"}) + "\n")


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    """A small random GPT-2 in Hugging Face's format (GPT-2's vocabulary), and a HellaSwag file."""
    d = tmp_path_factory.mktemp("hellaswag")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=50257, n_positions=64, n_embd=64, n_layer=2, n_head=4)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # larger weights than the init's: losses far apart, so the choices are clear-cut
        for p in hf.parameters():
            p.mul_(3.0)
    hf.save_pretrained(d / "hf")
    (d / "tokenizer").mkdir()  # transformers' own GPT-2 tokenizer, from the BPE files our tokenizer reads
    shutil.copy(asset_path("encoder.json"), d / "tokenizer" / "vocab.json")
    shutil.copy(asset_path("vocab.bpe"), d / "tokenizer" / "merges.txt")
    write_hellaswag(d / "val.jsonl", 13, random.Random(0))
    return d, hf


def reference(hf, d, path) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """(sum, mean) of the loss of each ending's tokens ((N, 4) each) and the labels, by transformers alone."""
    tok = transformers.GPT2Tokenizer.from_pretrained(d / "tokenizer")
    sums, means, labels = [], [], []
    for line in open(path):
        ex = json.loads(line)
        ctx = tok.encode(ex["ctx"])
        row_sums = []
        for end in ex["endings"]:
            tokens = torch.tensor([ctx + tok.encode(" " + end)])  # (1, L)
            with torch.no_grad():
                logits = hf(tokens).logits[0, :-1]  # (L - 1, V): position t predicts token t + 1
            losses = F.cross_entropy(logits.double(), tokens[0, 1:], reduction="none")[len(ctx) - 1:]
            row_sums.append((losses.sum().item(), losses.mean().item()))
        sums.append([s for s, _ in row_sums])
        means.append([m for _, m in row_sums])
        labels.append(ex["label"])
    return torch.tensor(sums, dtype=torch.float64), torch.tensor(means, dtype=torch.float64), labels


def test_scores_equal_transformers_gpt2_example_by_example(gpt2):
    d, hf = gpt2
    examples = read_hellaswag(d / "val.jsonl")
    ours = score(load_hf(d / "hf").eval(), examples, batch_size=5)  # batches of 20 rows, padded
    sums, means, labels = reference(hf, d, d / "val.jsonl")
    torch.testing.assert_close(ours["sum_losses"], sums, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours["mean_losses"], means, rtol=1e-5, atol=1e-5)
    assert (sums.sort(1).values[:, 1] - sums.min(1).values).min() > 1e-3  # no near-ties to flip
    labels = torch.tensor(labels)
    assert ours["correct"] == int((sums.argmin(1) == labels).sum())
    assert ours["correct_norm"] == int((means.argmin(1) == labels).sum())
    assert (sums.argmin(1) != means.argmin(1)).any()  # the file tells acc from acc_norm
    result = evaluate(EvalConfig(hellaswag=str(d / "val.jsonl"), hf=str(d / "hf"), batch_size=4, device="cpu"),
                      say=lambda *a: None)
    assert result == {"n": 13, "acc": ours["correct"] / 13, "acc_norm": ours["correct_norm"] / 13}


def test_gpt_eval_scores_a_checkpoint(gpt2, tmp_path, capsys):
    d, _ = gpt2
    save_checkpoint(load_hf(d / "hf"), tmp_path / "ckpt")
    want = evaluate(EvalConfig(hellaswag=str(d / "val.jsonl"), hf=str(d / "hf"), device="cpu"), say=lambda *a: None)
    assert main(["eval", "--hellaswag", str(d / "val.jsonl"), "--checkpoint", str(tmp_path / "ckpt"),
                 "--batch-size", "3", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert f"HellaSwag: acc {want['acc']:.4f}, acc_norm {want['acc_norm']:.4f} (13 examples)" in out


@pytest.mark.gpu_path
def test_the_triton_kernels_score_as_pytorch(gpt2):
    d, _ = gpt2
    device = "cuda" if torch.cuda.is_available() else "cpu"  # the interpreter on the CPU
    examples = read_hellaswag(d / "val.jsonl", limit=2)
    model = load_hf(d / "hf").to(device).eval()
    want = ending_losses(model, examples, torch.device(device))
    model.kernel_backend = "triton"
    got = ending_losses(model, examples, torch.device(device))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


def test_hellaswag_during_training_goes_into_the_log(gpt2, tmp_path):
    d, _ = gpt2
    run = train(TrainConfig(preset="tiny", context_length=32, max_steps=6, eval_every=2, eval_batches=1,
                            sample_tokens=0, device="cpu", out=str(tmp_path / "run"), hellaswag=str(d / "val.jsonl"),
                            hellaswag_every=4))
    scored = {r["step"]: r for r in run.evals if "hellaswag_acc" in r}
    assert sorted(scored) == [0, 4, 6]  # every 4 steps from the start, and at the end
    final = evaluate(EvalConfig(hellaswag=str(d / "val.jsonl"), checkpoint=str(tmp_path / "run"), device="cpu"),
                     say=lambda *a: None)
    assert (scored[6]["hellaswag_acc"], scored[6]["hellaswag_acc_norm"]) == (final["acc"], final["acc_norm"])
    with pytest.raises(ValueError, match="--hellaswag-every 3 must be a multiple of --eval-every 2"):
        train(TrainConfig(preset="tiny", eval_every=2, hellaswag=str(d / "val.jsonl"), hellaswag_every=3))


@pytest.mark.parametrize("line, says", [
    ('{"ctx": "A man", "endings": ["a", "b", "c", "d"], "label": 1', "not valid JSON"),
    ('{"ctx": "A man", "endings": ["a", "b", "c"], "label": 1}', "'endings' must be a list of 4 non-empty strings"),
    ('{"ctx": "A man", "endings": ["a", "b", "c", "d"], "label": 4}', "'label' must be 0, 1, 2 or 3, got 4"),
    ('{"ctx": "A man", "endings": ["a", "b", "c", "d"], "label": ""}', "the test split has no labels"),
    ('{"ctx_a": "A man", "endings": ["a", "b", "c", "d"], "label": 0}', "'ctx' must be a non-empty string"),
    ('["A man", ["a", "b", "c", "d"], 0]', "a JSON list, not an object"),
])
def test_a_malformed_line_is_refused_with_its_number(gpt2, tmp_path, capsys, line, says):
    d, _ = gpt2
    path = tmp_path / "bad.jsonl"
    good = (d / "val.jsonl").read_text().splitlines()
    path.write_text("\n".join(good[:2] + [""] + [line] + good[2:4]) + "\n")  # line 4, after an empty one
    assert main(["eval", "--hellaswag", str(path), "--hf", str(d / "hf"), "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"gpt eval: error: {path}:4: " in err and says in err, err
