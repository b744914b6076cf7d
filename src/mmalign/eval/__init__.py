"""mmalign.eval"""
