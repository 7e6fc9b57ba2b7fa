"""reparam.models"""
