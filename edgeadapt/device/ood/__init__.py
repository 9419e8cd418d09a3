"""device/ood"""
