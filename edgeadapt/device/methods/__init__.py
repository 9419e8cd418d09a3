"""device/methods"""
