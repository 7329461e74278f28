"""bpleader: keep exactly one EOSIO/Antelope block producer node producing."""

__version__ = "0.1.0"
