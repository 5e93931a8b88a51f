"""The DVC headline file: a few short keys, the stronger random baseline, a dataset level only
when a preset evaluates several datasets."""

from __future__ import annotations

import pandas as pd

from iicrepro.headline import headline


def rows(dataset: str, protocol: str, init: str, value: float, **kw) -> dict:
    row = {"dataset": dataset, "protocol": protocol, "init": init, "variant": "",
           "view": "residual", "modality": "joint", "metric": "top1", "split": "1",
           "value": value}  # fmt: skip
    return {**row, **kw}


def table(*datasets: str) -> pd.DataFrame:
    out = []
    for d in datasets:
        out += [
            rows(d, "retrieval", "iic", 60.0),
            rows(d, "retrieval", "iic", 70.0),  # another intra-negative: averaged
            rows(d, "retrieval", "iic", 99.0, modality="rgb"),  # not the headline feature
            rows(d, "retrieval", "iic", 99.0, metric="top5"),
            rows(d, "retrieval", "cmc", 50.0),
            rows(d, "retrieval", "random", 20.0),  # BN as initialised: summary.csv only
            rows(d, "retrieval", "random", 30.0, variant="bnrecal"),
            rows(d, "finetune", "iic", 80.0, modality="rgb"),
            rows(d, "finetune", "random", 40.0, modality="rgb"),
        ]
    return pd.DataFrame(out)


def test_one_dataset_gives_short_flat_keys():
    assert headline(table("synthetic")) == {
        "top1": {"iic": 65.0, "cmc": 50.0, "rand": 30.0},
        "ft": {"iic": 80.0, "rand": 40.0},
    }


def test_several_datasets_get_a_level_each_and_fine_tuning_uses_the_split_mean():
    t = table("ucf101", "hmdb51")
    split2 = t[t["protocol"] == "finetune"].assign(split="2", value=t["value"] + 10)
    mean = t[t["protocol"] == "finetune"].assign(split="mean", value=t["value"] + 5)
    tree = headline(pd.concat([t, split2, mean], ignore_index=True))
    assert tree["top1"]["hmdb51"] == {"iic": 65.0, "cmc": 50.0, "rand": 30.0}
    assert tree["ft"] == {
        "ucf101": {"iic": 85.0, "rand": 45.0},
        "hmdb51": {"iic": 85.0, "rand": 45.0},
    }


def test_an_empty_table_gives_an_empty_file():
    assert headline(pd.DataFrame()) == {}
