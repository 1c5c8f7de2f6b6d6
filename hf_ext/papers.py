"""The papers behind hf_ext's methods, and ``Method``, the record of one method that a model card lists."""

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Paper:
    title: str
    arxiv_id: str
    citation: str  # BibTeX


@dataclass
class Method:
    """One hf_ext method used in a run, as the model card lists it: its label, its Hub tag, its papers and the
    hyper-parameters that define it. Each method builds its own (``card_section``); the card only renders them."""

    name: str
    tag: str
    papers: tuple[Paper, ...]
    hyperparameters: dict = field(default_factory=dict)


def _bibtex(key: str, title: str, authors: str, arxiv_id: str, year: int) -> str:
    return (
        f"@article{{{key},\n    title   = {{{{{title}}}}},\n    author  = {{{authors}}},\n"
        f"    journal = {{arXiv preprint arXiv:{arxiv_id}}},\n    year    = {{{year}}}\n}}"
    )


def _paper(key: str, title: str, authors: str, arxiv_id: str, year: int) -> Paper:
    return Paper(title, arxiv_id, _bibtex(key, title, authors, arxiv_id, year))


BA = _paper(
    "zeng2026balanced",
    "Balanced Aggregation: Understanding and Fixing Aggregation Bias in GRPO",
    "Zhiyuan Zeng and Jiameng Huang and Zhangyue Yin and Jiashuo Liu and Ziniu Li and Bingrui Li and Yuhao Wu and "
    "Yining Zheng and Ge Zhang and Wenhao Huang and Xipeng Qiu",
    "2605.04077",
    2026,
)
REAL = _paper(
    "zhai2026rewards",
    "Rewards as Labels: Revisiting RLVR from a Classification Perspective",
    "Zepeng Zhai and Meilin Chen and Jiaxuan Zhao and Junlang Qian and Lei Shen and Yuan Lu",
    "2602.05630",
    2026,
)
GTPO = _paper(
    "simoni2025gtpo",
    "GTPO: Stabilizing Group Relative Policy Optimization via Gradient and Entropy Control",
    "Marco Simoni and Aleksandar Fontana and Giulio Rossolini and Andrea Saracino and Paolo Mori",
    "2508.03772",
    2025,
)
DORA = _paper(
    "liu2024dora",
    "DoRA: Weight-Decomposed Low-Rank Adaptation",
    "Shih-Yang Liu and Chien-Yi Wang and Hongxu Yin and Pavlo Molchanov and Yu-Chiang Frank Wang and "
    "Kwang-Ting Cheng and Min-Hung Chen",
    "2402.09353",
    2024,
)
SCALING_DORA = _paper(
    "zelenin2026scaling",
    "Scaling DoRA: High-Rank Adaptation via Factored Norms and Fused Kernels",
    "Zelenin and Zhuravlyova",
    "2603.22276",
    2026,
)
ALLORA = _paper(
    "huang2024allora",
    "ALLoRA: Adaptive Learning Rate Mitigates LoRA Fatal Flaws",
    "Hai Huang and Randall Balestriero",
    "2410.09692",
    2024,
)
ADAMW_4BIT = _paper(
    "li2023memory",
    "Memory Efficient Optimizers with 4-bit States",
    "Bingrui Li and Jianfei Chen and Jun Zhu",
    "2309.01507",
    2023,
)
