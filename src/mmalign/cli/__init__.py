"""mmalign.cli"""
