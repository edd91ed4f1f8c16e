"""A seeded generator of synthetic medical evidence: candidate papers with abstracts and chunks.

Used for the shipped example job and by the benchmark. Abstract lengths are log-normal around
~1,300 characters (many reach the 1,500-character cut of stage 1); chunks are 400-1,400 characters.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

DRUGS = ["apixaban", "rivaroxaban", "dabigatran", "edoxaban", "warfarin", "enoxaparin", "aspirin", "clopidogrel",
         "empagliflozin", "dapagliflozin", "metformin", "semaglutide", "atorvastatin", "ramipril", "amiodarone"]
CONDITIONS = ["atrial fibrillation", "chronic kidney disease", "end-stage renal disease on hemodialysis",
              "venous thromboembolism", "heart failure with reduced ejection fraction", "type 2 diabetes",
              "acute ischemic stroke", "coronary artery disease", "cancer-associated thrombosis", "hypertension"]
DESIGNS = ["randomized controlled trial", "retrospective cohort study", "prospective registry",
           "systematic review and meta-analysis", "nested case-control study", "post hoc analysis of a phase 3 trial"]
OUTCOMES = ["major bleeding", "stroke or systemic embolism", "all-cause mortality", "intracranial hemorrhage",
            "hospitalization for heart failure", "decline in estimated glomerular filtration rate",
            "gastrointestinal bleeding", "recurrent venous thromboembolism", "myocardial infarction"]
POPULATIONS = ["older adults", "patients with creatinine clearance below 30 mL/min", "women", "Asian patients",
               "patients with prior stroke", "frail nursing-home residents", "patients after catheter ablation"]
SECTIONS = ["Introduction", "Methods", "Results", "Discussion", "Limitations"]


def _sentence(rng: random.Random) -> str:
    drug, other = rng.sample(DRUGS, 2)
    outcome = rng.choice(OUTCOMES)
    population = rng.choice(POPULATIONS)
    condition = rng.choice(CONDITIONS)
    hr = rng.uniform(0.45, 1.6)
    low, high = hr * rng.uniform(0.6, 0.9), hr * rng.uniform(1.1, 1.5)
    templates = [
        f"Compared with {other}, {drug} was associated with a hazard ratio for {outcome} of {hr:.2f} "
        f"(95% CI {low:.2f} to {high:.2f}) among {population} with {condition}.",
        f"We enrolled {rng.randint(120, 48000):,} {population} with {condition} across {rng.randint(3, 210)} centres.",
        f"The primary outcome was {outcome}; secondary outcomes included {rng.choice(OUTCOMES)} and {rng.choice(OUTCOMES)}.",
        f"Over a median follow-up of {rng.uniform(0.5, 6):.1f} years, {outcome} occurred in {rng.uniform(0.4, 12):.1f}% "
        f"of patients receiving {drug} and {rng.uniform(0.4, 12):.1f}% of those receiving {other}.",
        f"Dose reduction of {drug} in {condition} followed the label in {rng.randint(40, 95)}% of prescriptions.",
        f"Results were consistent across subgroups defined by age, sex, renal function and prior {outcome}.",
        f"Residual confounding cannot be excluded because {drug} was chosen by the treating physician.",
        f"These findings support {drug} as a reasonable option for {population} with {condition}.",
    ]
    return rng.choice(templates)


def _text(rng: random.Random, chars: int) -> str:
    parts: list[str] = []
    while sum(len(p) + 1 for p in parts) < chars:
        parts.append(_sentence(rng))
    return " ".join(parts)


def abstract_length(rng: random.Random) -> int:
    """Log-normal abstract length around ~1,300 characters, between 200 and 3,000."""
    return int(min(3000, max(200, rng.lognormvariate(7.15, 0.35))))


def make_candidates(n: int = 100, seed: int = 0, with_chunks: float = 0.5) -> list[dict]:
    """Return `n` candidate papers; a share `with_chunks` carries chunks, the rest full text with headings."""
    rng = random.Random(seed)
    papers = []
    for i in range(n):
        drug, other = rng.sample(DRUGS, 2)
        condition = rng.choice(CONDITIONS)
        design = rng.choice(DESIGNS)
        title = f"{drug.capitalize()} versus {other} in {condition}: a {design}"
        labels = ["BACKGROUND", "METHODS", "RESULTS", "CONCLUSIONS"]
        size = abstract_length(rng)
        abstract = " ".join(f"{label}: {_text(rng, size // 4)}" for label in labels)[: size + 200]
        paper: dict = {"id": f"PMID{31000000 + i * 7919}", "title": title, "text": abstract,
                       "metadata": {"year": rng.randint(2008, 2025), "design": design}}
        if rng.random() < with_chunks:
            paper["chunks"] = [
                {"id": f"{paper['id']}:{n}", "section": section, "text": _text(rng, rng.randint(400, 1400))}
                for n, section in enumerate(rng.sample(SECTIONS, rng.randint(3, 5)))
            ]
        else:
            body = "\n\n".join(f"## {s}\n\n{_text(rng, rng.randint(500, 1800))}" for s in SECTIONS[:4])
            paper["text"] = f"{abstract}\n\n{body}"
        papers.append(paper)
    return papers


def make_chunks(n: int = 100, seed: int = 0) -> list[dict]:
    """Return `n` stage-2 chunks of 400-1,400 characters."""
    rng = random.Random(seed + 1)
    return [
        {"id": f"c{i}", "doc_id": f"d{i // 5}", "title": f"{rng.choice(DRUGS).capitalize()} in {rng.choice(CONDITIONS)}",
         "section": rng.choice(SECTIONS), "text": _text(rng, rng.randint(400, 1400))}
        for i in range(n)
    ]


QUERY = "apixaban versus rivaroxaban in atrial fibrillation with chronic kidney disease"


if __name__ == "__main__":
    job = {"query": QUERY, "top_k_docs": 20, "top_k_chunks": 10, "candidates": make_candidates(100, seed=7)}
    target = Path(__file__).with_name("af_ckd_job.json")
    target.write_text(json.dumps(job, indent=1) + "\n")
    print(f"wrote {target} ({len(job['candidates'])} candidates)")
