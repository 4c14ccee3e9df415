"""ISO 4217 currency codes a charge may use.

A snapshot of ISO 4217 List One (active codes) as of 2026, currencies only:
fund codes (BOV, CHE, CHW, CLF, COU, MXV, USN, UYI, UYW), precious metals,
bond-market units, SDR, the testing code XTS and "no currency" XXX are left
out because nothing is charged to a card in them. Withdrawn codes (HRK, CUC,
SLL, ZWL, ANG, BGN, …) are refused: an amount in a withdrawn currency is
almost certainly a stale client.
"""

from __future__ import annotations

ACTIVE_CURRENCIES: frozenset[str] = frozenset(
    """
    AED AFN ALL AMD AOA ARS AUD AWG AZN BAM BBD BDT BHD BIF BMD BND BOB BRL
    BSD BTN BWP BYN BZD CAD CDF CHF CLP CNY COP CRC CUP CVE CZK DJF DKK DOP
    DZD EGP ERN ETB EUR FJD FKP GBP GEL GHS GIP GMD GNF GTQ GYD HKD HNL HTG
    HUF IDR ILS INR IQD IRR ISK JMD JOD JPY KES KGS KHR KMF KPW KRW KWD KYD
    KZT LAK LBP LKR LRD LSL LYD MAD MDL MGA MKD MMK MNT MOP MRU MUR MVR MWK
    MXN MYR MZN NAD NGN NIO NOK NPR NZD OMR PAB PEN PGK PHP PKR PLN PYG QAR
    RON RSD RUB RWF SAR SBD SCR SDG SEK SGD SHP SLE SOS SRD SSP STN SVC SYP
    SZL THB TJS TMT TND TOP TRY TTD TWD TZS UAH UGX USD UYU UZS VED VES VND
    VUV WST XAF XCD XCG XOF XPF YER ZAR ZMW ZWG
    """.split()
)
