"""Teacher/student zoo on timm, the feature interface, decoders and the segmentor."""
