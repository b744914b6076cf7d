"""mmalign.recipes"""
