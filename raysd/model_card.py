"""The README.md model card of a `raysd export` folder. Ray-free and torch-free."""
from __future__ import annotations

from typing import Any

TIMM_DIR = "timm"  # the export's timm model, a subfolder of the transformers one


def model_card(meta: dict, card: dict, notes: list[str]) -> str:
    """README.md: what the model is, the trial's parameters and metrics (`card`), how to load it."""
    vit = meta["family"] == "vit"
    title = f"# {meta['model']} fine-tuned by raysd"
    if "study" in card and "trial_id" in card:
        title += f": study {card['study']}, trial {card['trial_id']}"
    classes = f"{meta['num_classes']} classes" + (f": {', '.join(meta['labels'])}" if meta["labels"] else "")
    lines = ["---", "library_name: transformers",
             f"pipeline_tag: {'image' if vit else 'text'}-classification",
             "tags: [raysd, self-distillation]", "---", "", title, "",
             f"Method `{card.get('method') or meta['method']}` (self-distillation for further "
             f"pre-training, Lee et al., ICLR 2023) from weights `{meta['weights']}`, fine-tuned "
             f"on `{meta['data']}` ({classes})."]
    scalars = [f"- {k}: {_cell(v)}" for k, v in card.items()
               if not isinstance(v, dict) and k not in ("study", "trial_id", "method")]
    lines += [""] + scalars if scalars else []
    for key, value in card.items():
        if isinstance(value, dict):
            lines += ["", f"## {key}", "", "| name | value |", "|---|---|"]
            lines += [f"| {k} | {_cell(v)} |" for k, v in value.items()]
    lines += ["", "## Loading", "", "```python", 'path = "."  # this folder']
    if vit:
        lines += ["from transformers import AutoImageProcessor, ViTForImageClassification",
                  "model = ViTForImageClassification.from_pretrained(path)",
                  "processor = AutoImageProcessor.from_pretrained(path)",
                  "import timm  # the same model in timm, with its preprocessing in model.pretrained_cfg",
                  f"model = timm.create_model(f\"local-dir:{{path}}/{TIMM_DIR}\", pretrained=True)"]
    else:
        lines += ["from transformers import AutoTokenizer, RobertaForSequenceClassification",
                  "model = RobertaForSequenceClassification.from_pretrained(path)",
                  "tokenizer = AutoTokenizer.from_pretrained(path)",
                  f"# raysd fine-tuned it on inputs of at most {meta['max_length']} tokens"]
    lines += ["```", "", "## Notes", ""] + [f"- {note}" for note in notes]
    return "\n".join(lines) + "\n"


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value).replace("|", "\\|")
