"""Datasets (labeled segmentation sets and unlabeled image folders) and transforms.

``config`` is the entry point (``DatasetConfig``, ``build_dataset``, ``dataset_info``,
``describe_dataset``, ``inspect_dataset``); each dataset is described once, as data, in its module
(``driving``: GTAV, Cityscapes, BDD100K, ACDC; ``mapillary``; ``isprs``: Potsdam, Vaihingen; ``camvid``;
``folder``: your own labelled data; ``layouts``: image folders); ``fractions`` chooses label fractions;
``benchmarks`` names the cross-domain benchmarks; ``transforms`` builds the train / eval transforms.
"""
