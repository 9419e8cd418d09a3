"""Formats and protocol shared by the device and the cloud. Torch-free by rule."""
