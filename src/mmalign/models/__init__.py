"""mmalign.models"""
