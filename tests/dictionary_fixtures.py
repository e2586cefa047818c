"""Inputs shared by the dictionary tests."""

# The seed tutorial's Dataset-Dictionary.json exactly as published: a trailing comma and a misspelt key.
TUTORIAL = """{
    "dataset1": {
        "data_path": "/path/to/images",
        "annotation_path": "/path/to/ann1.json",
        "length": 1000,
        "sampleing_rate": 0.05437
    },
    "dataset2": {
        "data_path": "/path/to/images",
        "annotation_path": "/path/to/ann2.jsonl",
        "length": 500,
        "sampling_rate": 0.567
    },
}
"""
