"""Datasets (labeled segmentation sets and unlabeled image folders) and transforms."""
